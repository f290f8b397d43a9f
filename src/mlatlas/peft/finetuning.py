"""Supervised fine-tuning, exact-match scoring and training-state bytes, for any PEFT method.

Every method of :mod:`mlatlas.peft` ends in a model whose trainable parameters are some
subset (full fine-tuning: all of them; LoRA: the factors; prefix tuning: the prefix; adapters:
the bottlenecks), so one loop fits them all: AdamW on the parameters that require grad,
linear warm-up and cosine decay (:func:`mlatlas.llm.pretraining.warmup_cosine_lr`), gradient
clipping, and the next-token cross-entropy on the answer tokens only

    L(θ) = -1/|A| Σ_{t ∈ A} log p_θ(x_{t+1} | x_{≤t})      (A: answer positions)

— supervised fine-tuning as in instruction tuning (Wei et al. 2022, "Finetuned Language
Models Are Zero-Shot Learners", arXiv:2109.01652). What a method saves in memory is what its
trainable parameters need: one gradient and AdamW's two moments each
(:func:`training_state_bytes`, counted from the tensors themselves).

=============  ==============================================================
``N_θ``        trainable parameters;  ``N`` all parameters (shared ones once)
share          ``N_θ / N``
bytes          ``Σ grad.nbytes + Σ optimizer-state tensor nbytes``
=============  ==============================================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mlatlas.datasets.instructions import (
    Instruction,
    InstructionBatch,
    encode_instructions,
    instruction_split,
)
from mlatlas.llm.generation import generate
from mlatlas.llm.llama import next_token_loss
from mlatlas.llm.pretraining import PretrainSchedule, warmup_cosine_lr
from mlatlas.runtime import progress

__all__ = ["Comparison", "FineTuneRun", "FineTuneSchedule", "InstructionTask", "Method", "MethodResult",
           "ParameterShare", "compare_methods", "exact_match", "instruction_task",
           "finetune", "make_optimizer", "parameter_share", "train_and_score", "train_step",
           "training_state_bytes"]


@dataclass(frozen=True)
class ParameterShare:
    """How many parameters train.

    Attributes:
        trainable: ``N_θ``.
        total: ``N`` (a parameter shared by two modules counts once).
    """

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """``N_θ / N``."""
        return self.trainable / self.total


def parameter_share(model: nn.Module) -> ParameterShare:
    """Count the trainable and all parameters of ``model``."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared one once
    return ParameterShare(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))


@dataclass(frozen=True)
class FineTuneSchedule:
    """What :func:`finetune` runs.

    Attributes:
        steps: Optimizer steps.
        batch: Examples per step.
        lr: Peak learning rate.
        warmup: Linear warm-up steps (then cosine to a tenth).
        weight_decay: AdamW decoupled weight decay on ≥ 2-D trainable parameters.
        clip_norm: Global gradient-norm clip.
    """

    steps: int
    batch: int
    lr: float
    warmup: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FineTuneSchedule.{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"FineTuneSchedule.lr must be > 0, got {self.lr!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based ``step`` (warm-up, cosine)."""
        return warmup_cosine_lr(PretrainSchedule(self.steps, self.batch, 1, self.lr,
                                                 max(self.warmup, 1)), step)


def make_optimizer(model: nn.Module, schedule: FineTuneSchedule) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (decay on matrices only).

    Raises:
        ValueError: nothing in ``model`` requires grad.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"model ({type(model).__name__}) has no parameter that requires grad")
    return torch.optim.AdamW(
        [{"params": [p for p in trainable if p.dim() >= 2],
          "weight_decay": schedule.weight_decay},
         {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.999))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: Tensor,
               labels: Tensor, clip_norm: float = 1.0) -> float:
    """One optimizer step on the answer-token loss; returns the loss."""
    # L(θ) = -1/|A| Σ_{t∈A} log p_θ(x_{t+1} | x_≤t): labels are -100 off the answer
    loss = next_token_loss(model(input_ids), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   clip_norm)
    optimizer.step()
    return loss.item()


@dataclass
class FineTuneRun:
    """What :func:`finetune` leaves.

    Attributes:
        optimizer: The AdamW it stepped (its state is what :func:`training_state_bytes`
            counts).
        losses: The training loss of every step.
    """

    optimizer: torch.optim.AdamW
    losses: list[float]


def finetune(model: nn.Module, data: InstructionBatch, schedule: FineTuneSchedule,
             generator: torch.Generator, description: str = "fine-tune") -> FineTuneRun:
    """Fine-tune the trainable parameters of ``model`` on ``data`` in place.

    Args:
        model: ``input_ids [B, T] → logits [B, T, V]`` (a :class:`~mlatlas.llm.llama.Llama`
            with LoRA/adapters, a :class:`~mlatlas.peft.prefix.PrefixTunedLM`, …).
        data: Tokenised examples (:func:`mlatlas.datasets.instructions.encode_instructions`).
        schedule: A :class:`FineTuneSchedule`.
        generator: The only randomness of the batch order.
        description: Progress-bar label.

    Returns:
        A :class:`FineTuneRun`.
    """
    optimizer = make_optimizer(model, schedule)
    model.train()
    losses = []
    n = data.input_ids.shape[0]
    for step in progress(range(schedule.steps), schedule.steps, description):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        idx = torch.randint(0, n, (schedule.batch,), generator=generator)
        losses.append(train_step(model, optimizer, data.input_ids[idx], data.labels[idx],
                                 schedule.clip_norm))
    model.eval()
    return FineTuneRun(optimizer, losses)


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the gradients and of the optimizer state, from the tensors themselves.

    Returns:
        ``{"gradients": Σ p.grad.nbytes, "optimizer_state": Σ state-tensor nbytes}`` (a
        gradient that is ``None`` counts 0; call after at least one step).
    """
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values()
                if isinstance(t, Tensor))
    return {"gradients": int(grads), "optimizer_state": int(state)}


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, examples: Sequence[Instruction],
                max_new_tokens: int = 3) -> float:
    """Fraction of ``examples`` whose greedy answer equals the reference exactly.

    Prompts are grouped by token length, so no row is padded; generation stops at the
    tokenizer's end-of-text, and the decoded continuation (stripped of surrounding spaces)
    must equal ``answer``.

    Args:
        model: Anything :func:`mlatlas.llm.generation.generate` decodes with.
        tokenizer: ``encode``, ``decode``, ``eot_id``.
        examples: The evaluation split.
        max_new_tokens: Longest continuation decoded.
    """
    if not examples:
        raise ValueError("examples must be non-empty, got 0")
    was_training = model.training
    model.eval()
    groups: dict[int, list[tuple[list[int], str]]] = defaultdict(list)
    for ex in examples:
        ids = tokenizer.encode(ex.prompt)
        groups[len(ids)].append((ids, ex.answer))
    correct = 0
    for length, rows in groups.items():
        prompts = torch.tensor([ids for ids, _ in rows])
        out = generate(model, prompts, max_new_tokens, eos_token_id=tokenizer.eot_id)
        for row, (_, answer) in zip(out[:, length:].tolist(), rows):
            if tokenizer.eot_id in row:
                row = row[:row.index(tokenizer.eot_id)]
            correct += tokenizer.decode(row).strip() == answer
    model.train(was_training)
    return correct / len(examples)


@dataclass
class MethodResult:
    """One fine-tuning method's numbers (see :func:`train_and_score`).

    Attributes:
        name: The method's label.
        trainable: ``N_θ``.
        total: ``N``.
        accuracy: Exact match on the evaluation split after training.
        gradient_bytes: ``Σ grad.nbytes`` after the last step.
        optimizer_bytes: AdamW state bytes after the last step.
        losses: Training loss per step.
        step: One more training step on a fixed batch (for
            :func:`mlatlas.measure.compare_times`; it keeps training the model).
        model: The fine-tuned model.
    """

    name: str
    trainable: int
    total: int
    accuracy: float
    gradient_bytes: int
    optimizer_bytes: int
    losses: list[float]
    step: Callable[[], float]
    model: nn.Module

    @property
    def share(self) -> float:
        """``N_θ / N``."""
        return self.trainable / self.total

    def smoothed_losses(self, window: int = 10) -> list[float]:
        """Training losses averaged over the trailing ``window`` steps (for plots)."""
        out = []
        for i in range(len(self.losses)):
            chunk = self.losses[max(0, i - window + 1):i + 1]
            out.append(sum(chunk) / len(chunk))
        return out


@dataclass
class InstructionTask:
    """The downstream task, ready to train on and to score.

    Attributes:
        train: Tokenised training split.
        eval: Evaluation examples (scored by :func:`exact_match`).
        tokenizer: The model's tokenizer (``encode``, ``decode``, ``eot_id``).
    """

    train: InstructionBatch
    eval: list[Instruction]
    tokenizer: Any


def instruction_task(tokenizer, n_train: int, n_eval: int, seed: int = 0,
                     length: int = 5) -> InstructionTask:
    """The synthetic instruction task of :mod:`mlatlas.datasets.instructions`, tokenised."""
    split = instruction_split(n_train, n_eval, seed, length)
    return InstructionTask(encode_instructions(split["train"], tokenizer), split["eval"],
                           tokenizer)


def train_and_score(name: str, model: nn.Module, task: InstructionTask,
                    schedule: FineTuneSchedule, seed: int,
                    max_new_tokens: int = 3) -> MethodResult:
    """Fine-tune ``model`` (its trainable parameters) on ``task`` and score it by exact match.

    Args:
        name: Label of the method.
        model: The model with only the method's parameters requiring grad.
        task: An :class:`InstructionTask`.
        schedule: A :class:`FineTuneSchedule`.
        seed: Seeds the batch order (and the fixed timing batch).
        max_new_tokens: Longest answer decoded.
    """
    count = parameter_share(model)
    run = finetune(model, task.train, schedule, torch.Generator().manual_seed(seed), name)
    nbytes = training_state_bytes(model, run.optimizer)
    accuracy = exact_match(model, task.tokenizer, task.eval, max_new_tokens)
    idx = torch.randint(0, task.train.input_ids.shape[0], (schedule.batch,),
                        generator=torch.Generator().manual_seed(seed + 1))
    ids, labels = task.train.input_ids[idx], task.train.labels[idx]

    def step() -> float:
        return train_step(model, run.optimizer, ids, labels, schedule.clip_norm)

    return MethodResult(name, count.trainable, count.total, accuracy, nbytes["gradients"],
                        nbytes["optimizer_state"], run.losses, step, model)


@dataclass(frozen=True)
class Method:
    """A fine-tuning method to compare.

    Attributes:
        make: ``seed → model`` with only the method's parameters requiring grad (a fresh copy
            of the base each call).
        schedule: Its :class:`FineTuneSchedule` (learning rates differ per method).
    """

    make: Callable[[int], nn.Module]
    schedule: FineTuneSchedule


@dataclass
class Comparison:
    """What :func:`compare_methods` measured.

    Attributes:
        results: Method name → one :class:`MethodResult` per seed.
        step_s: Method name → median seconds of one training step (interleaved timing).
        seeds: The fine-tuning seeds, in the order of each method's results.
    """

    results: dict[str, list[MethodResult]]
    step_s: dict[str, float]
    seeds: list[int]

    def accuracy(self, name: str) -> float:
        """Mean exact match of ``name`` over the seeds."""
        runs = self.results[name]
        return sum(r.accuracy for r in runs) / len(runs)

    def metrics(self, key: Callable[[str], str] = lambda name: name) -> dict[str, float]:
        """Every method's numbers as flat metrics ``<key(name)>_<what>`` for a report."""
        out: dict[str, float] = {}
        for name, runs in self.results.items():
            k, first = key(name), runs[0]
            out[f"{k}_trainable_share"] = first.share
            out[f"{k}_trainable_params"] = first.trainable
            out[f"{k}_accuracy_mean"] = self.accuracy(name)
            out.update({f"{k}_accuracy_seed{seed}": r.accuracy for seed, r in zip(self.seeds, runs)})
            out[f"{k}_grad_bytes"] = first.gradient_bytes
            out[f"{k}_optimizer_state_bytes"] = first.optimizer_bytes
            out[f"{k}_step_s"] = self.step_s[name]
        return out


def compare_methods(methods: dict[str, Method], task: InstructionTask, seeds: Sequence[int],
                    timing_repeats: int = 3) -> Comparison:
    """Fine-tune and score every method on every seed, then time their steps side by side.

    The step times come from :func:`mlatlas.measure.compare_times` over the last seed's
    models, interleaved (one step of each method per round, after one warm-up step).
    """
    from mlatlas.measure import compare_times

    if not methods or not seeds:
        raise ValueError(f"methods and seeds must be non-empty, got {len(methods)} methods and "
                         f"{len(seeds)} seeds")
    results: dict[str, list[MethodResult]] = {name: [] for name in methods}
    for seed in seeds:
        for name, method in methods.items():
            results[name].append(train_and_score(name, method.make(seed), task,
                                                 method.schedule, seed))
    times = compare_times({name: runs[-1].step for name, runs in results.items()},
                          repeats=timing_repeats, warmup=1)
    return Comparison(results, {name: t.median_s for name, t in times.items()}, list(seeds))
