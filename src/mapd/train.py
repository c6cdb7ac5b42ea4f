"""Joint-loss fine-tuning of the student: alpha * L_feedback + (1 - alpha) * L_rationale."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TrainConfig(BaseModel):
    """Training settings; the defaults are the paper's (METHOD.md step 6)."""

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the feedback loss; 0 trains on rationales only.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (constant after warm-up).")
    lr_scheduler_type: str = Field("constant_with_warmup", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    num_train_epochs: float = Field(10, gt=0, description="Epochs over the instruction data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Longer prompt+completion pairs are truncated (prompt first).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; default: on where the GPU supports it.")
    seed: int = Field(731, description="Training seed.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, le=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts.")
    merge_lora: bool = Field(True, description="Save LoRA merged into full weights (else the adapter only).")
    logging_steps: int = Field(1, ge=1, description="Log the loss every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (training resumes from the last).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")

    model_config = {"extra": "forbid"}
