"""GRPO vs PPO on a verifiable task, from the same tiny pretrained Llama.

The task is single-digit addition (:mod:`mlatlas.datasets.arithmetic`): the 25 prompts
``"a+b="`` with ``0 ≤ a, b ≤ 4``, reward 1 when the completion starts with the right number,
else 0 (an exact-match verifier). The pretrained model (stdlib docstrings) puts about half of
its next-token mass on digits after ``"a+b="`` but knows no sums: it starts near chance. Both algorithms start from the shared tiny pretrained model, see the
same prompts in the same order, sample ``G`` completions per prompt and take the same number
of optimiser steps per rollout with the same AdamW settings:

* **GRPO** (:class:`~mlatlas.alignment.rl_trainers.GRPOTrainer`): group-standardised rewards
  as advantages, clipped ratio, ``k3`` KL to the reference in the loss — no critic;
* **PPO** (:class:`~mlatlas.alignment.rl_trainers.PPOTrainer`): a critic (a copy of the
  pretrained trunk with a scalar head), per-token KL penalty in the reward, GAE, clipped policy
  and value losses.

Claims (targets fixed before running, in :class:`Config`):

* **mean reward rises** for each: the exact-match rate of sampled answers (``eval_samples``
  per problem at temperature 1, all problems) rises by at least ``reward_gain_target`` = 0.10
  from the start to the end of training;
* **GRPO saves at least the critic and its optimizer state**: the peak memory of building an
  algorithm's training state and running its first step (:class:`mlatlas.measure.PeakMemory`,
  every tensor storage allocated inside) is larger for PPO than for GRPO by at least the bytes
  of the critic's parameters plus its AdamW state, both summed from the tensors themselves.

``bench`` (``mlatlas bench grpo``) measures the same peak memory and the step time of both
side by side (:func:`mlatlas.measure.compare_times`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlatlas.alignment.ppo import ValueModel
from mlatlas.alignment.rl_trainers import GRPOTrainer, PPOTrainer, SamplingConfig
from mlatlas.alignment.rollout import Rollout, sample_completions
from mlatlas.datasets.arithmetic import addition_problems, exact_match
from mlatlas.measure import PeakMemory, compare_times
from mlatlas.plots import figure
from mlatlas.report import Report
from mlatlas.runtime import progress

ALGORITHMS = ("GRPO", "PPO")


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores.

    Claimed targets (fixed before running): ``reward_gain_target`` for each algorithm, and
    PPO's extra peak memory ≥ its critic's parameters + AdamW state.
    """

    seed: int = 0  # seeds the prompt order, the samplers and the evaluation
    max_operand: int = 4  # problems a+b= with 0 ≤ a, b ≤ max_operand ...
    max_sum: int = 9  # ... and a + b ≤ max_sum (single-digit answers; 25 problems)
    prompts_per_step: int = 8  # P prompts per rollout
    group_size: int = 8  # G samples per prompt (GRPO's group; PPO gets the same samples)
    max_new_tokens: int = 2  # longest completion (the digit, then anything but a digit)
    temperature: float = 1.0  # sampling temperature (training and evaluation)
    steps: int = 30  # rollouts (trainer steps) per algorithm
    updates: int = 2  # optimizer steps per rollout (both algorithms)
    lr: float = 1e-3  # AdamW learning rate (both; PPO's critic too)
    beta: float = 0.04  # GRPO's KL coefficient β
    kl_coef: float = 0.04  # PPO's per-token KL penalty in the reward
    loss_type: str = "grpo"  # GRPO aggregation: grpo | bnpo | dr_grpo | dapo
    eval_samples: int = 8  # sampled answers per problem when evaluating the reward
    reward_gain_target: float = 0.10  # claimed rise of the evaluated reward (both algorithms)
    bench_repeats: int = 3  # timed steps per algorithm in bench (after one warm-up)
    threads: int = 1  # torch threads (a tiny model: one thread is fastest)

    @classmethod
    def smoke(cls) -> Config:
        """Two steps on a few prompts (tests)."""
        return cls(prompts_per_step=2, group_size=2, steps=2, updates=1, eval_samples=1,
                   bench_repeats=1)

    @classmethod
    def full(cls) -> Config:
        """All 55 single-digit sums, longer training, more evaluation samples."""
        return cls(max_operand=9, steps=120, eval_samples=32)


def load_policy():
    """The shared tiny pretrained model: ``(model, tokenizer)``."""
    from mlatlas.llm.zoo import tiny_llama

    lm = tiny_llama()
    return lm.model, lm.tokenizer


class Task:
    """The addition problems as token prompts, and the exact-match reward of a rollout."""

    def __init__(self, cfg: Config, tokenizer):
        self.tok = tokenizer
        problems = addition_problems(cfg.max_operand, cfg.max_sum)
        self.prompts = [tokenizer.encode(p.prompt) for p in problems]
        self.answer = {tuple(ids): p.answer for ids, p in zip(self.prompts, problems)}

    def reward(self, rollout: Rollout) -> torch.Tensor:
        """``[N]`` exact-match rewards of the rollout's completions."""
        texts = [self.tok.decode(c) for c in rollout.completions(self.tok.eot_id)]
        return torch.tensor([exact_match(t, self.answer[tuple(p)])
                             for t, p in zip(texts, rollout.prompts())])

    def batch(self, n: int, gen: torch.Generator) -> list[list[int]]:
        idx = torch.randperm(len(self.prompts), generator=gen)[:n].tolist()
        return [self.prompts[i] for i in idx]


def _sampling(cfg: Config, tok) -> SamplingConfig:
    return SamplingConfig(samples_per_prompt=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, eos_token_id=tok.eot_id)


def build(kind: str, start: nn.Module, cfg: Config, task: Task, gen: torch.Generator):
    """A fresh trainer of ``kind`` whose policy (and PPO's critic) start as copies of ``start``;
    the reference is ``start`` itself (frozen, shared)."""
    policy = copy.deepcopy(start).requires_grad_(True).train()
    sampling = _sampling(cfg, task.tok)
    if kind == "GRPO":
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
        return GRPOTrainer(policy, opt, task.reward, sampling, reference=start, beta=cfg.beta,
                           loss_type=cfg.loss_type, updates=cfg.updates, generator=gen)
    critic = ValueModel.from_policy(start)
    opt = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=cfg.lr)
    return PPOTrainer(policy, critic, opt, task.reward, sampling, reference=start,
                      kl_coef=cfg.kl_coef, updates=cfg.updates, generator=gen)


@torch.no_grad()
def evaluate(policy: nn.Module, task: Task, cfg: Config) -> float:
    """Exact-match rate of ``eval_samples`` sampled answers per problem (fixed seed)."""
    r = sample_completions(policy, task.prompts, num_samples=cfg.eval_samples,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           eos_token_id=task.tok.eot_id,
                           generator=torch.Generator().manual_seed(cfg.seed + 12345))
    return float(task.reward(r).mean())


def critic_state_bytes(trainer: PPOTrainer) -> tuple[int, int]:
    """Bytes of the critic's parameters and of its AdamW state, summed from the tensors."""
    params = list(trainer.critic.parameters())
    param_bytes = sum(p.untyped_storage().nbytes() for p in params)
    state = [t for p in params for t in trainer.optimizer.state.get(p, {}).values()
             if isinstance(t, torch.Tensor)]
    return param_bytes, sum(t.untyped_storage().nbytes() for t in state)


def step_memory(kind: str, start: nn.Module, cfg: Config, task: Task,
                prompts: list[list[int]]) -> tuple[int, object]:
    """Peak bytes of building ``kind``'s training state (policy copy, critic, optimizer) and
    running its first step, measured by :class:`PeakMemory` on the CPU; and the trainer."""
    with PeakMemory("cpu") as mem:
        trainer = build(kind, start, cfg, task, torch.Generator().manual_seed(cfg.seed))
        trainer.step(prompts)
    return mem.peak_bytes, trainer


def run(cfg: Config, out: Path) -> Report:
    """Train GRPO and PPO side by side; evaluate the reward; measure the memory of each."""
    out = Path(out)
    rep = Report()
    start, tok = load_policy()
    start.requires_grad_(False).eval()
    task = Task(cfg, tok)
    reward0 = rep.metric("evaluated reward at the start", evaluate(start, task, cfg))
    rep.metric("problems", len(task.prompts))
    curves: dict[str, list[float]] = {}
    final: dict[str, float] = {}
    for kind in ALGORITHMS:
        trainer = build(kind, start, cfg, task, torch.Generator().manual_seed(cfg.seed))
        order = torch.Generator().manual_seed(cfg.seed + 1)  # same prompts for both
        curves[kind] = []
        for _ in progress(range(cfg.steps), cfg.steps, kind):
            stats = trainer.step(task.batch(cfg.prompts_per_step, order))
            curves[kind].append(stats.reward)
        final[kind] = evaluate(trainer.policy, task, cfg)
        rep.metric(f"{kind}: evaluated reward at the end", final[kind])
        rep.metric(f"{kind}: training reward, last step", stats.reward)
        rep.metric(f"{kind}: KL to the reference per token, last rollout", stats.kl)
        rep.claim(f"{kind}: evaluated reward rise (end − start)", final[kind] - reward0,
                  cfg.reward_gain_target, ">=", target_source="reward_gain_target",
                  detail=f"{reward0:.3f} → {final[kind]:.3f}; exact match of {cfg.eval_samples} "
                         f"sampled answers per problem, {cfg.steps} rollouts × "
                         f"{cfg.prompts_per_step}×{cfg.group_size} samples")

    prompts = task.batch(cfg.prompts_per_step, torch.Generator().manual_seed(cfg.seed + 2))
    peak = {kind: step_memory(kind, start, cfg, task, prompts) for kind in ALGORITHMS}
    param_bytes, opt_bytes = critic_state_bytes(peak["PPO"][1])
    saving = peak["PPO"][0] - peak["GRPO"][0]
    rep.metric("GRPO peak bytes (state + first step)", peak["GRPO"][0])
    rep.metric("PPO peak bytes (state + first step)", peak["PPO"][0])
    rep.metric("critic parameter bytes", param_bytes)
    rep.metric("critic AdamW state bytes", opt_bytes)
    rep.metric("PPO − GRPO beyond critic params + state (grads, values, activations)",
               saving - param_bytes - opt_bytes)
    rep.claim("PPO peak − GRPO peak ≥ critic parameters + its AdamW state", saving,
              param_bytes + opt_bytes, ">=", unit="bytes",
              detail="PeakMemory('cpu'): every storage allocated while building the training "
                     "state and running the first step; right side summed from the critic's "
                     "tensors")
    rep.note("both algorithms: same start, same prompts, same samples per prompt, "
             f"{cfg.updates} AdamW steps per rollout at lr {cfg.lr:g}")

    with figure(out / "reward.png", title="exact-match reward, single-digit addition") as (
            _, ax):
        for kind, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), ys, label=f"{kind} (training rollouts)")
        ax.axhline(reward0, color="k", ls="--", lw=1, label="evaluated at start")
        for kind, c in zip(ALGORITHMS, ("tab:blue", "tab:orange")):
            ax.axhline(final[kind], color=c, ls=":", lw=1.5, label=f"{kind} evaluated at end")
        ax.set_xlabel("rollout")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize="small")
    rep.figure(out / "reward.png")
    return rep


def bench(cfg: Config, out: Path) -> Report:
    """Peak memory and step time of one GRPO step vs one PPO step, side by side."""
    rep = Report()
    start, tok = load_policy()
    start.requires_grad_(False).eval()
    task = Task(cfg, tok)
    prompts = task.batch(cfg.prompts_per_step, torch.Generator().manual_seed(cfg.seed + 2))
    peak = {kind: step_memory(kind, start, cfg, task, prompts) for kind in ALGORITHMS}
    param_bytes, opt_bytes = critic_state_bytes(peak["PPO"][1])
    for kind in ALGORITHMS:
        rep.metric(f"{kind} peak bytes (state + first step)", peak[kind][0])
    rep.claim("peak memory GRPO / PPO", peak["GRPO"][0] / peak["PPO"][0],
              1 - (param_bytes + opt_bytes) / peak["PPO"][0], "<=", unit="x",
              detail="target: PPO's peak minus its critic's parameters and AdamW state")
    trainers = {kind: peak[kind][1] for kind in ALGORITHMS}
    times = compare_times({kind: (lambda t=t: t.step(prompts)) for kind, t in trainers.items()},
                          repeats=cfg.bench_repeats, warmup=1)
    for kind in ALGORITHMS:
        rep.metric(f"{kind} step time (s, median)", times[kind].median_s)
    rep.claim("step time GRPO / PPO", times["GRPO"].median_s / times["PPO"].median_s, 1.0, "<",
              unit="x", detail=f"one rollout of {cfg.prompts_per_step}×{cfg.group_size} "
                               f"samples + {cfg.updates} updates; median of "
                               f"{cfg.bench_repeats}, interleaved")
    rep.note(f"threads: {torch.get_num_threads()}; memory on the CPU (PeakMemory('cpu'))")
    return rep
