"""RAIT training (stage 2 of CRaFT): supervised fine-tuning with TRL's ``SFTTrainer``.

Zhu et al., CRaFT, AAAI-25, arXiv 2410.06913, §4 (stage 2) and the training configs of its
public code (github.com/opendatalab/CRaFT). The presets (:data:`PRESETS`):

- ``open_qa``: full fine-tune, learning rate 8e-6, 3 epochs;
- ``mcq``: LoRA (r 64, alpha 16, dropout 0.1, every linear layer), learning rate 2e-4,
  3 epochs.

Every field can be overridden (:class:`TrainParams`). Data are (rendered prompt, completion)
pairs: the prompt is already rendered with the model's chat template
(:mod:`engines.prompts`), exactly as an engine sees it at inference, and TRL's
prompt-completion path masks the prompt (``completion_only_loss``) and appends the end
token to the completion. The result is a Hugging Face model folder (LoRA merged into the
weights, tokenizer copied) that vLLM loads like any model, written atomically.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.base import EngineError
from engines.checkpoints import save_checkpoint
from engines.models import model_dir
from engines.prompts import tokenizer


class TrainParams(BaseModel):
    """SFT hyper-parameters; :func:`preset` gives the CRaFT code's stage-2 values."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["full", "lora"] = "full"
    learning_rate: float = Field(default=8e-6, ge=0.0)
    epochs: float = Field(default=3.0, gt=0.0)
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
        "constant_with_warmup", "inverse_sqrt",
    ] = "cosine"  # fmt: skip
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_length: int = Field(default=1024, ge=1)
    lora_r: int = Field(default=64, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    seed: int = 42
    threads: int | None = Field(default=None, ge=1)
    """torch threads while training (default: torch's own choice)."""


PRESETS: dict[str, dict[str, Any]] = {
    "open_qa": {"method": "full", "learning_rate": 8e-6, "epochs": 3.0},
    "mcq": {"method": "lora", "learning_rate": 2e-4, "epochs": 3.0},
}
"""Stage-2 settings of the CRaFT code, per task."""


def preset(task: str, **overrides: Any) -> TrainParams:
    """The preset of ``task`` (``open_qa`` or ``mcq``) with ``overrides`` on top; for another
    task (e.g. ``instruction``) the :class:`TrainParams` defaults with ``overrides``.

    Raises:
        EngineError: a parameter is unknown or out of range.
    """
    try:
        return TrainParams(**{**PRESETS.get(task, {}), **overrides})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        raise EngineError(f"bad training parameter: {problems}") from None


def train_sft(
    model_path: str | Path,
    pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    params: TrainParams,
    *,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` on (rendered prompt, completion) pairs into ``out_dir``.

    Returns the run's record: ``loss`` (one point per optimiser step: step, epoch, loss,
    learning rate), ``steps``, ``seconds`` and ``examples``. ``progress`` shows the
    trainer's progress bar; ``on_log`` receives every logged point.

    Raises:
        EngineError: no training pairs, or the model folder is missing.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _QuietProgress(ProgressCallback):  # type: ignore[misc]
        def on_log(self, *args: Any, **kwargs: Any) -> None:
            return None

    from trl import SFTConfig, SFTTrainer

    if not pairs:
        raise EngineError("training needs at least one (prompt, completion) pair")
    source = str(model_dir(model_path))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A scratch folder for the trainer, removed at the end, not renamed into place: the
    # model itself reaches out_dir atomically through save_checkpoint (storage.atomic).
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    threads = torch.get_num_threads()
    points: list[dict[str, float]] = []

    class _Record(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                point = {
                    "step": state.global_step,
                    "epoch": round(float(logs.get("epoch", state.epoch or 0)), 4),
                    "loss": round(loss, 5) if math.isfinite(loss) else None,  # JSON-clean
                    "learning_rate": float(logs.get("learning_rate", 0.0)),
                }
                points.append(point)
                if on_log is not None:
                    on_log(point)

    started = time.perf_counter()
    try:
        if params.threads:
            torch.set_num_threads(params.threads)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        config = SFTConfig(
            output_dir=str(work / "trainer"),
            num_train_epochs=params.epochs,
            learning_rate=params.learning_rate,
            per_device_train_batch_size=params.batch_size,
            gradient_accumulation_steps=params.gradient_accumulation,
            lr_scheduler_type=params.lr_scheduler,
            warmup_steps=params.warmup_ratio,  # a float below 1 is a ratio of the steps
            weight_decay=params.weight_decay,
            max_length=params.max_length,
            completion_only_loss=True,
            packing=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=params.seed,
            data_seed=params.seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )
        peft_config = None
        if params.method == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=params.lora_r,
                lora_alpha=params.lora_alpha,
                lora_dropout=params.lora_dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
        data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer(source),
            peft_config=peft_config,
            callbacks=[_Record()],
        )
        # No log dict per step on stdout (_Record keeps them): the printer goes, and the
        # progress bar stays without writing logs.
        trainer.remove_callback(PrinterCallback)
        if progress:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(_QuietProgress())
        trainer.train()
        trained = trainer.model
        if params.method == "lora":
            trained = trained.merge_and_unload()
        save_checkpoint(trained, source, out_dir)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "loss": points,
        "steps": points[-1]["step"] if points else 0,
        "examples": len(pairs),
        "seconds": round(time.perf_counter() - started, 2),
    }
