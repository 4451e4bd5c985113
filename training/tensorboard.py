"""TensorBoard event files beside log.jsonl, for ``tensorboard --logdir runs``.

The optional extra ``tensorboard`` (``pip install 'losa-tal[tensorboard]'``) turns them on; without
it training writes log.jsonl alone. From the records log.jsonl gets (training/train.py):

    loss/step, lr/<parameter group>      every optimizer step
    loss/epoch                           every epoch
    mAP/average, mAP/tIoU_<t>            every evaluation
    losa/gate_norm/<range>/layer_<block> every epoch: the L2 norm of each adapter's gate (short
                                         and long range, per adapted store block)

all against the optimizer step, so that a resumed run continues the same curves.
"""
from __future__ import annotations


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class EventLog:
    """Writes the scalars of log records into ``run_dir``'s event files."""

    def __init__(self, run_dir, model, layers):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.model, self.layers = model, list(layers)

    def write(self, record: dict) -> None:
        event, step = record.get("event"), record.get("step")
        scalars = {}
        if event == "step":
            scalars["loss/step"] = record["loss"]
            scalars.update({f"lr/{name}": lr for name, lr in record["lr"].items()})
        elif event == "epoch":
            scalars["loss/epoch"] = record["loss"]
            scalars.update(self._gate_norms())
        elif event == "eval":
            scalars["mAP/average"] = record["average_map"]
            scalars.update({f"mAP/tIoU_{t}": value for t, value in record["map"].items()})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if scalars:
            self.writer.flush()

    def _gate_norms(self) -> dict:
        losa = getattr(self.model, "losa", None)
        if losa is None:
            return {}
        return {f"losa/gate_norm/{name}/layer_{self.layers[position]}": norm
                for (name, position), norm in losa.gate_norms().items()}

    def close(self) -> None:
        self.writer.close()
