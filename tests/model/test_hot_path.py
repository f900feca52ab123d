"""The training step as a GPU runs it, checked on the CPU: no host syncs, compact samples
converted on the device, channels-last convolutions and cuDNN's autotuner on CUDA, fused
AdamW, and ``compile`` (on in ``uni-gpu``) computing what eager does."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cellseg.training.config import load_config
from cellseg.training.dataset import SAMPLE_DTYPES, CellDataset
from cellseg.training.distributed import World
from cellseg.training.loop import PROGRESS_EVERY, batch_step, run_epoch, setup_run, to_device
from tests.conftest import TINY

pytestmark = pytest.mark.model

CPU = World(0, 1, 0, torch.device("cpu"))
# aten ops that read a device value back to the host: item() and friends, and the ops whose
# output shape depends on the data
READ_BACK = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
}


HOST_SIDE = ("torch/optim/", "torch/utils/data/")


def _masked_indexing(name: str, args: tuple) -> bool:
    """``x[mask]`` (and its assignment): the result's size is the mask's count."""
    if name not in ("aten::index", "aten::index_put", "aten::index_put_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())


def _caller_module(depth: int) -> str:
    return sys._getframe(depth + 1).f_globals.get("__name__", "")


class HostSyncs(TorchDispatchMode):
    """The calls that make the host wait for a GPU, counted wherever the code runs (on a CPU
    they cost nothing, but they are the same calls): every aten op that reads a value back,
    and cellseg's own copies of host data in (``torch.tensor``, ``new_tensor``,
    ``as_tensor``: a blocking copy on CUDA) or of device data out (``cpu``, ``numpy``,
    ``tolist``).

    Not counted: reads inside ``torch.utils.data`` (the DataLoader draws its workers' base
    seed from a CPU tensor, on the host whatever the device) and ``torch.optim`` (the CPU's
    AdamW keeps its step counts on the host; on CUDA the loop uses the fused AdamW, whose
    counts live on the device: ``test_cuda_gets_channels_last_cudnn_autotuning_and_fused_adamw``).
    """

    PATCHED = (
        (torch, "tensor"),
        (torch, "as_tensor"),
        (torch.Tensor, "new_tensor"),
        (torch.Tensor, "cpu"),
        (torch.Tensor, "numpy"),
        (torch.Tensor, "tolist"),
    )

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._saved = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        counted = name in READ_BACK or _masked_indexing(name, args)
        if counted and not self._inside_host_bookkeeping():
            self.calls.append(f"{name} from {self._cellseg_frame()}")
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _inside_host_bookkeeping() -> bool:
        frame = sys._getframe(1)
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in HOST_SIDE):
                return True
            frame = frame.f_back
        return False

    @staticmethod
    def _cellseg_frame() -> str:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith("cellseg"):
                return f"{frame.f_globals['__name__']}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def _counting(self, owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = _caller_module(1)
            if caller.startswith("cellseg"):
                self.calls.append(f"{name} from {caller}")
            return original(*args, **kwargs)

        return original, wrapper

    def __enter__(self):
        for owner, name in self.PATCHED:
            original, wrapper = self._counting(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        self._saved.clear()
        return super().__exit__(*exc)


@pytest.fixture
def run(dataset, tmp_path):
    """A run after one validation batch: what a process copies once (the class weights onto
    the device) is behind it, as it is for every step after the first."""
    config = load_config("local", 1, [*TINY, "grad_accum=2", "limit_train_images=6"])
    run = setup_run(1, dataset, tmp_path, config, None, None, CPU)
    batch_step(run, run.model, next(iter(run.val_loader)), False, 1, True, torch.zeros(5))
    return run


def test_the_counter_sees_the_syncs_it_is_meant_to_catch():
    """So that the tests below, which find none, could have found some."""
    x = torch.ones(3)
    with HostSyncs() as syncs:
        _ = x.sum().item()  # a read-back op, from this (non-cellseg) module
        _ = bool(x[0] > 0)
        _ = x[x > 0]  # data-dependent shape
    assert len(syncs.calls) == 3, syncs.calls


def test_a_training_step_and_a_validation_step_wait_for_nothing(run):
    """Forward, losses, backward, the optimizer step closing an accumulation group, and the
    running loss sums: all queued on the device, none read back."""
    batches = [batch for batch, _ in zip(run.train_loader, range(3), strict=False)]
    sums = torch.zeros(5, dtype=torch.float64)
    before = [p.detach().clone() for p in run.model.decoder.parameters()]
    with HostSyncs() as syncs:
        for i, batch in enumerate(batches[:2]):  # one group of grad_accum=2: one optimizer step
            batch_step(run, run.train_model, batch, True, 2, i == 1, sums)
        batch_step(run, run.model, batches[2], False, 1, True, sums)
    assert syncs.calls == []
    moved = [
        not torch.equal(a, p) for a, p in zip(before, run.model.decoder.parameters(), strict=True)
    ]
    assert any(moved)  # the optimizer step ran
    assert sums[-1] == sum(b["image"].shape[0] for b in batches)


def test_an_epoch_reads_its_losses_once_plus_the_progress_bar(run):
    n_batches = len(run.train_loader)
    assert n_batches < PROGRESS_EVERY
    with HostSyncs() as syncs:
        losses = run_epoch(run, run.train_loader, True, "test")
    assert syncs.calls == ["tolist from cellseg.training.loop"]
    assert set(losses) == {"total", "np", "hv", "nc"} and losses["total"] > 0


def test_samples_travel_compact_and_become_floats_on_the_device(dataset):
    """uint8 images and class maps from the loader (a 480x640 sample: 4.3 MB, not 11 MB); on
    the device the image is the float in [0, 1] the model always got, classes int64."""
    sample = CellDataset(dataset, "train", (64, 96), augment=True, crop=48)[0]
    assert {k: v.dtype for k, v in sample.items()} == SAMPLE_DTYPES
    batch = {k: v.unsqueeze(0) for k, v in sample.items()}
    on_device = to_device(batch, torch.device("cpu"))
    assert on_device["image"].dtype == torch.float32
    assert torch.equal(on_device["image"], batch["image"].float() / 255)
    assert on_device["np"].dtype == on_device["nc"].dtype == torch.int64
    assert torch.equal(on_device["nc"], batch["nc"].long())


def test_cuda_gets_channels_last_cudnn_autotuning_and_fused_adamw(dataset, tmp_path, monkeypatch):
    """What ``setup_run`` does for a CUDA device, with the device check pointed at the CPU
    (no GPU here): convolution weights and input images channels-last, and the step computes
    what it computes contiguous; cuDNN's benchmark mode and AdamW's fused kernel for CUDA."""
    from cellseg import runtime
    from cellseg.training.loop import build_optimization, forward_loss

    config = load_config("local", 1, [*TINY, "limit_train_images=2"])
    plain = setup_run(1, dataset, tmp_path / "plain", config, None, None, CPU)
    batch = next(iter(plain.val_loader))
    with torch.no_grad():
        contiguous = forward_loss(plain.model.eval(), batch, config, torch.device("cpu"))
    monkeypatch.setattr(runtime, "uses_channels_last", lambda device: True)
    nhwc = setup_run(1, dataset, tmp_path / "nhwc", config, None, None, CPU)
    convs = [m.weight for m in nhwc.model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    image = to_device(batch, torch.device("cpu"))["image"]
    assert image.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        channels_last = forward_loss(nhwc.model.eval(), batch, config, torch.device("cpu"))
    assert torch.allclose(contiguous["total"], channels_last["total"], rtol=1e-4)

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    runtime.configure_backends(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    optimizer, _ = build_optimization(plain.model, 1, config, 2, torch.device("cuda"))
    assert optimizer.defaults["fused"] is True
    cpu_optimizer, _ = build_optimization(plain.model, 1, config, 2, torch.device("cpu"))
    assert not cpu_optimizer.defaults["fused"]


def test_uni_gpu_compiles_and_the_compiled_model_computes_what_eager_does(dataset, tmp_path):
    assert load_config("uni-gpu", 1).compile and load_config("uni-gpu", 2).compile
    config = load_config("local", 1, [*TINY, "compile=true", "limit_train_images=2"])
    run = setup_run(1, dataset, tmp_path, config, None, None, CPU)
    assert isinstance(run.train_model, torch._dynamo.eval_frame.OptimizedModule)
    run.model.eval()
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, compiled = run.model(x), run.train_model(x)
    for head in ("np", "hv", "nc"):
        assert torch.allclose(eager[head], compiled[head], atol=1e-4), head


def test_the_progress_bar_reads_the_running_loss_every_progress_every_batches(run, monkeypatch):
    from cellseg.training import loop

    monkeypatch.setattr(loop, "PROGRESS_EVERY", 1)
    with HostSyncs() as syncs:
        run_epoch(run, run.train_loader, True, "test")
    reads = [c for c in syncs.calls if c.startswith("aten::_local_scalar_dense")]
    assert len(reads) == len(run.train_loader)  # one per batch at PROGRESS_EVERY = 1
    assert syncs.calls[-1] == "tolist from cellseg.training.loop"


def test_a_resumed_optimizer_takes_this_devices_kernel_and_its_weights_layout(run):
    """A state saved under CUDA's fused AdamW resumed on a CPU runs the CPU's implementation
    (the figures the docs report), and moments take their weight's memory layout (the fused
    kernel refuses a contiguous moment of a channels-last weight)."""
    from cellseg.training.loop import build_optimization, match_optimizer_to_device

    model = run.model
    cuda_choice, _ = build_optimization(model, 1, run.config, 2, torch.device("cuda"))
    model(torch.rand(1, 3, 64, 96))["np"].sum().backward()
    cuda_choice.step()  # the fused kernel also runs on a CPU
    saved = cuda_choice.state_dict()
    model.to(memory_format=torch.channels_last)
    resumed, _ = build_optimization(model, 1, run.config, 2, torch.device("cpu"))
    resumed.load_state_dict(saved)
    assert all(g["fused"] for g in resumed.param_groups)  # what load_state_dict alone keeps
    match_optimizer_to_device(resumed)
    assert not any(g["fused"] for g in resumed.param_groups)
    convs = [p for p in model.parameters() if p.dim() == 4 and p in resumed.state]
    assert convs
    for weight in convs:
        moment = resumed.state[weight]["exp_avg"]
        assert moment.stride() == weight.stride()
        assert torch.equal(moment, saved["state"][_index(resumed, weight)]["exp_avg"])


def _index(optimizer, param) -> int:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)
