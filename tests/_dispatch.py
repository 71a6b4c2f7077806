"""The aten ops a block of test code dispatches: ``with DispatchedOps() as ops: ...; ops.names``."""

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """The aten ops dispatched inside the ``with`` block, by schema name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))
