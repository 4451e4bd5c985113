"""Host syncs in training: the counter (tests/helpers/syncs.py) sees every kind of call that
makes the host wait for the device, and a real optimizer step makes one of them, however many
micro-batches it accumulates (issue 20: "at most one host sync per optimiser step")."""
import pytest
import torch

from helpers import slow_except
from helpers.syncs import SyncCounter, reads_optimizer_step_counts
from helpers.training import tiny_config
from training.train import Trainer, train

X = torch.arange(6.0)
ONES = torch.ones(6, dtype=torch.long)
SYNCING = {
    "item": lambda: X.sum().item(),
    "bool": lambda: bool((X > 2).any()),
    "if": lambda: 1 if X.max() > 2 else 0,
    "int": lambda: int(X[0]),
    "float": lambda: float(X[0]),
    "tolist": lambda: X.tolist(),
    "numpy": lambda: X.numpy(),
    "boolean-mask indexing": lambda: X[X > 2],
    "boolean-mask assignment": lambda: X.clone().__setitem__(X > 2, 0.0),
    "nonzero": lambda: torch.nonzero(X),
    "masked_select": lambda: torch.masked_select(X, X > 2),
    "unique": lambda: torch.unique(X),
    "repeat_interleave": lambda: torch.repeat_interleave(X, ONES),
    # from pageable host memory to another device (meta stands in for a GPU here)
    "blocking copy to a device": lambda: X.to("meta"),
    "non-blocking copy from pageable memory": lambda: X.to("meta", non_blocking=True),
    "copy into a device tensor": lambda: torch.empty(6, device="meta").copy_(X),
}
SYNC_FREE = {
    "masked sum": lambda: torch.where(X > 2, X, 0.0).sum(),
    "integer indexing": lambda: X[torch.tensor([1, 3])],
    "sized repeat_interleave": lambda: torch.repeat_interleave(X, ONES, output_size=6),
    "fixed-size nonzero": lambda: torch.nonzero_static(X, size=6),
    "copy to the same device": lambda: X.to("cpu"),
    "reduction kept as a tensor": lambda: (X > 2).sum() + X.max(),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_the_counter_records_each_call_that_waits_for_the_device_once(name):
    with SyncCounter() as syncs:
        SYNCING[name]()
    assert len(syncs.events) == 1, syncs.report()
    assert syncs.events[0].caller.startswith(__file__)   # points at the code that asked


@pytest.mark.parametrize("name", sorted(SYNC_FREE))
def test_the_counter_records_nothing_for_calls_that_do_not_wait(name):
    with SyncCounter() as syncs:
        SYNC_FREE[name]()
    assert syncs.events == [], syncs.report()


def test_the_fused_adamw_that_cuda_training_uses_reads_nothing_back():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    for fused in (True, False):
        optimizer = torch.optim.AdamW(params, fused=fused)
        for _ in range(2):
            (params[0].sum() + params[1].square().sum()).backward()
            with SyncCounter() as syncs:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if fused:
                assert syncs.events == [], syncs.report()
            else:
                assert syncs.events and all(map(reads_optimizer_step_counts, syncs.events))


@pytest.mark.parametrize("case", slow_except(["losa", "head_only", "head_only/after"],
                                              fast=["losa"]))
def test_an_optimizer_step_waits_for_the_device_once(dataset_files, tmp_path, monkeypatch, case):
    """Two steps of two micro-batches (gradient accumulation) of two videos each; the loss
    normaliser moves before the step (ActionFormer, the default) or after it."""
    model_type, _, normalizer_update = case.partition("/")
    step_events = []
    optimizer_step = Trainer._optimizer_step

    def counted(self, *args):
        with SyncCounter() as syncs:
            loss = optimizer_step(self, *args)
        step_events.append([e for e in syncs.events if not reads_optimizer_step_counts(e)])
        return loss

    monkeypatch.setattr(Trainer, "_optimizer_step", counted)
    config = tiny_config(model={"type": model_type},
                         train={"epochs": 2, "batch_size": 4, "micro_batch": 2,
                                "normalizer_update": normalizer_update or "before"})
    train(config, *dataset_files, tmp_path / "run", progress=False)
    print(f"\n{model_type}: host syncs per optimizer step {[len(e) for e in step_events]}")
    assert len(step_events) == 2
    for events in step_events:
        assert len(events) == 1, "\n".join(map(str, events))
        # the read of the step's loss, summed over micro-batches and processes on the device
        assert events[0].kind == "item()" and "training/train.py:" in events[0].caller



def test_the_forward_pass_never_waits_and_decoding_waits_twice_per_level_and_video():
    from head import ActionFormerHead

    torch.manual_seed(0)
    head = ActionFormerHead(16, 3, embed_dim=32, num_heads=2, window=5, max_seq_len=128).eval()
    x, mask = torch.randn(2, 128, 16), torch.ones(2, 128, dtype=torch.bool)
    with torch.no_grad(), SyncCounter() as forward:
        out = head(x, mask)
    assert forward.events == [], forward.report()
    with SyncCounter() as decoding:   # candidates before NMS, as training/infer.py asks for them
        head.predict(out, nms_method="none")
    assert [e.kind for e in decoding.events] == ["nonzero"] * (2 * len(head.strides) * 2)
