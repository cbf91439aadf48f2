"""A dict of tensors with HFWeights' interface, for feeding one linear to a converter's reader."""

from qruntime.errors import MissingTensorError


class TensorDict(dict):
    def get(self, name):
        if name not in self:
            raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint")
        return self[name]
