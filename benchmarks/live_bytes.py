"""Live tensor bytes, op by op: the tracker behind benchmarks/memory_predict.py.

`LiveBytes` is a `TorchDispatchMode` that sees every ATen op and registers each new
storage of its outputs once (views share their base's storage and are not counted
again); a `weakref.finalize` on the storage subtracts its bytes when it is freed.
Under a `FakeTensorMode` it also runs the batch's own index arithmetic for real, so a
whole training step runs on shapes alone (docs/memory_prediction.md).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# Under FakeTensorMode, results of real ops above this many elements become fake.
REAL_LIMIT = 2**22


def _storage(t):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, op by op: each storage counted once, from the op whose
    output first shows it until it is freed (`weakref.finalize` on the storage,
    whose Python object lives exactly as long as the storage itself).

    `fake`: the FakeTensorMode below this one, if any. Then ops that touch no fake
    tensor (index arithmetic on the batch) run for real outside it, boolean masks
    that are real become index tensors, and `.item()` of a fake tensor reads 1."""

    def __init__(self, fake=None):
        super().__init__()
        self.fake = fake
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_at: dict = {}
        self.ops = 0
        self.phase = ""
        self.largest: dict[str, int] = {}

    # bookkeeping
    def add(self, t, op: str = "baseline") -> None:
        s = _storage(t)
        if s is None:
            return
        key = s._cdata
        if key in self.live:
            return
        n = s.nbytes()
        self.live[key] = n
        self.current += n
        weakref.finalize(s, self._free, key)
        if n > self.largest.get(op, 0):
            self.largest[op] = n

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def add_all(self, tensors) -> int:
        before = self.current
        for t in tensors:
            self.add(t)
        self.peak = max(self.peak, self.current)
        return self.current - before

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_at = {"op": "start", "phase": self.phase}

    # dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run(func, args, kwargs)
        self.ops += 1
        name = str(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            self.add(t, name)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = {"op": name, "phase": self.phase, "op_index": self.ops}
        return out

    def _fake_if_large(self, t):
        if isinstance(t, torch.Tensor) and t.numel() > REAL_LIMIT:
            return self.fake.from_tensor(t)
        return t

    def _run(self, func, args, kwargs):
        if self.fake is None:
            return func(*args, **kwargs)
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        flat = tree_flatten((args, kwargs))[0]
        if not any(isinstance(a, FakeTensor) for a in flat):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            # A large result (the packed layout's [N, N] attention mask) goes on
            # as a fake tensor: its bytes are counted, its users cost nothing.
            return tree_map(self._fake_if_large, out)
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            if dtype == torch.bool:
                return True
            return 1.0 if dtype.is_floating_point else 1
        if func.overloadpacket in _INDEXING:
            args = (args[0], _bool_to_index(args[1]), *args[2:])
        return func(*args, **kwargs)


_INDEXING = {
    torch.ops.aten.index,
    torch.ops.aten.index_put,
    torch.ops.aten.index_put_,
    torch.ops.aten._index_put_impl_,
}


def _bool_to_index(indices):
    """Real boolean masks as the long index tensors they stand for (nonzero has no
    fake result: its size depends on the values, which are real here)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    out = []
    for idx in indices:
        if (
            isinstance(idx, torch.Tensor)
            and idx.dtype == torch.bool
            and not isinstance(idx, FakeTensor)
        ):
            with unset_fake_temporarily():
                out.extend(idx.nonzero().unbind(1))
        else:
            out.append(idx)
    return out


def toy_check() -> dict:
    """The tracker against a hand count: fp32 x[1000] (4000 B) in the baseline;
    y = x*2 (4000), v = y[10:] (a view: 0), z = y.sum() (4), w = zeros(250, int64)
    (2000); del y, v (frees 4000), u = exp(z) (4). Peak = 4000+4000+4+2000 = 10004;
    live at the end 4000+4+2000+4 = 6008."""
    x = torch.ones(1000)
    with LiveBytes() as m:
        m.add_all([x])
        y = x * 2
        v = y[10:]
        z = y.sum()
        w = torch.zeros(250, dtype=torch.int64)
        del y, v
        after_free = m.current
        u = torch.exp(z)
    got = {"peak": m.peak, "live_after_free": after_free, "live_end": m.current}
    want = {"peak": 10004, "live_after_free": 6004, "live_end": 6008}
    del w, u
    return {"got": got, "expected": want, "exact": got == want}
