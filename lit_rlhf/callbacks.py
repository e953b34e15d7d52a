"""Callbacks: throughput and what else observes training without steering it."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: input tokens per wall-clock second, all ranks together.

    Measured between consecutive batch ends, so it includes data loading and the optimizer
    step, and averaged over ``window`` steps to smooth out noise.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._times: list[float] = []
        self._tokens: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._times, self._tokens = [time.perf_counter()], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())
        self._tokens.append(int(batch["input_ids"].numel()) * trainer.world_size)
        self._times, self._tokens = self._times[-self.window - 1 :], self._tokens[-self.window :]
        elapsed = self._times[-1] - self._times[0]
        if elapsed > 0:
            pl_module.log("train/tokens_per_s", sum(self._tokens) / elapsed, rank_zero_only=True)


class NonFiniteLossError(RuntimeError):
    """A loss, reward, weight or optimizer moment became NaN or infinite."""


def newest_checkpoint(trainer) -> tuple[str, int] | None:
    """(path, global step) of the newest checkpoint this run wrote, if any."""
    saved = [(cb._last_checkpoint_saved, cb._last_global_step_saved)
             for cb in trainer.checkpoint_callbacks if getattr(cb, "_last_checkpoint_saved", "")]
    return max(saved, key=lambda item: item[1]) if saved else None


class SampleTable(L.Callback):
    """Every N rollouts, a TensorBoard text table of prompt / response / score / KL samples.

    Reads ``pl_module.last_samples`` (a list of dicts, set by the PPO module each rollout).
    """

    def __init__(self, every_n_rollouts: int = 10, rows: int = 8) -> None:
        if every_n_rollouts < 1 or rows < 1:
            raise ValueError(f"SampleTable: every_n_rollouts and rows must be >= 1, got {every_n_rollouts}, {rows}")
        self.every_n_rollouts, self.rows = every_n_rollouts, rows

    @staticmethod
    def markdown(samples: list[dict], rows: int) -> str:
        """A markdown table of the first ``rows`` samples (pipes escaped)."""

        def cell(value) -> str:
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            return text.replace("|", "\\|").replace("\n", " ")

        keys = list(samples[0]) if samples else []
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(s[k]) for k in keys) + " |" for s in samples[:rows]]
        return "\n".join(lines)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples = getattr(pl_module, "last_samples", None)
        done = getattr(pl_module, "rollouts_done", batch_idx + 1)
        if not samples or done % self.every_n_rollouts or not trainer.is_global_zero:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples", self.markdown(samples, self.rows), global_step=done)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading as a stage's run: ``Rollout`` for the online
    methods (one batch is one rollout), ``Epoch N`` without Lightning's ``/-2`` when the run
    is bounded by steps, and no ``v_num``. The CLI adds it unless the config names a progress bar."""

    def _get_train_description(self, current_epoch: int) -> str:
        online = hasattr(self.trainer.lightning_module, "rollouts_done")
        description = "Rollouts" if online else f"Epoch {current_epoch}"
        if not online and self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
