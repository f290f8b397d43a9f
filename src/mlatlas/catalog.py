"""The catalog: one row per method of the atlas.

This table is the single source for the command line (``mlatlas list``, ``run``, ``tour``,
``bench``), the tour report and the README's method table. It must stay importable without
torch so that listing the atlas is instant: experiment modules are named here as strings and
imported only when a method is run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["FIELDS", "METHODS", "Method", "UnknownMethodError", "by_field", "get"]


@dataclass(frozen=True)
class Method:
    """One method of the atlas.

    Attributes:
        id: Kebab-case identifier, what ``mlatlas run`` takes (``"ddim"``).
        field: The field it belongs to (``"generative"``); one of :data:`FIELDS`.
        title: Human title, ``"<short name> — <what it is>"``.
        paper: Authors, year and arXiv id (or venue) of the paper it implements.
        reference: What the parity test compares against.
        claim: The headline claim the experiment reproduces in numbers.
        experiment: Dotted path of the experiment module, or ``None`` while not built.
    """

    id: str
    field: str
    title: str
    paper: str
    reference: str
    claim: str
    experiment: str | None = None

    @property
    def built(self) -> bool:
        """Whether the method has its experiment (and so its component and tests)."""
        return self.experiment is not None


class UnknownMethodError(KeyError):
    """Raised for an id that is not in the catalog; carries the closest ids."""

    def __init__(self, method_id: str, suggestions: list[str]):
        self.method_id = method_id
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown method id {method_id!r}{hint} (see `mlatlas list`)")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


FIELDS: tuple[str, ...] = (
    "rl", "llm", "attention", "peft", "alignment", "generative", "vision", "features",
)

M = Method
METHODS: tuple[Method, ...] = (
    # ---------------------------------------------------------------- rl
    M("gridworld", "rl", "Grid world — Bellman equation, value/policy iteration",
      "Zhao 2025, Mathematical Foundations of Reinforcement Learning, ch. 2-4; Bellman 1957",
      "linear solve of the Bellman equation",
      "iterative policy evaluation equals the closed form (≤1e-8); value iteration, policy "
      "iteration and truncated PI reach the same optimal policy",
      experiment="mlatlas.experiments.rl.gridworld"),
    M("stochastic-approximation", "rl", "Stochastic approximation — Robbins–Monro, SGD/BGD/MBGD",
      "Robbins & Monro 1951, Ann. Math. Statist. 22(3):400-407",
      "closed-form mean / root",
      "converges under the Robbins–Monro step-size conditions and not when they are violated",
      experiment="mlatlas.experiments.rl.stochastic_approximation"),
    M("monte-carlo", "rl", "Monte Carlo control — MC basic, exploring starts, ε-greedy",
      "Sutton & Barto 2018, Reinforcement Learning: An Introduction, ch. 5",
      "value iteration's optimal policy",
      "finds the optimal policy of the grid world",
      experiment="mlatlas.experiments.rl.monte_carlo"),
    M("policy-gradient", "rl", "Policy gradient — REINFORCE with a baseline",
      "Williams 1992, Machine Learning 8:229-256",
      "— (learning curve on gymnasium CartPole-v1)",
      "solves CartPole-v1 (average return ≥ 475 over the last 20 episodes)",
      experiment="mlatlas.experiments.rl.policy_gradient"),
    M("trpo", "rl", "TRPO — trust region policy optimisation",
      "Schulman, Levine, Moritz, Jordan, Abbeel 2015, arXiv:1502.05477",
      "sb3-contrib TRPO, side by side",
      "CartPole-v1 = 500 at 100k steps; every update's KL ≤ δ",
      experiment="mlatlas.experiments.rl.trpo"),
    M("ddpg", "rl", "DDPG — deep deterministic policy gradient",
      "Lillicrap et al. 2016, arXiv:1509.02971",
      "stable-baselines3 DDPG, side by side",
      "Pendulum-v1 ≥ −200 at 20k steps (SB3: −152)",
      experiment="mlatlas.experiments.rl.ddpg"),
    # ---------------------------------------------------------------- llm
    M("llama", "llm", "LLaMA / Llama 3 — pre-RMSNorm, SwiGLU, RoPE, GQA decoder",
      "Touvron et al. 2023, arXiv:2302.13971; Grattafiori et al. 2024, arXiv:2407.21783",
      "transformers LlamaForCausalLM",
      "identical logits on shared weights; cached decoding equals full recompute; a tiny "
      "model pretrains on embedded text",
      experiment="mlatlas.experiments.llm.llama"),
    M("activations", "llm", "Activation functions — from the perceptron step to SwiGLU",
      "Hendrycks & Gimpel 2016, arXiv:1606.08415; Shazeer 2020, arXiv:2002.05202",
      "torch.nn.functional",
      "identical values and grads; vanishing gradients/dead ReLUs in a deep MLP; GLU FFN vs "
      "ReLU FFN at equal parameters on a tiny LM",
      experiment="mlatlas.experiments.llm.activations"),
    M("adamw", "llm", "AdamW — decoupled weight decay",
      "Loshchilov & Hutter 2019, arXiv:1711.05101",
      "torch.optim.AdamW, torch.optim.Adam",
      "same trajectory over 1000 steps; L2-in-Adam ≠ decoupled weight decay",
      experiment="mlatlas.experiments.llm.adamw"),
    M("gradient-checkpointing", "llm", "Gradient checkpointing — recompute in backward",
      "Chen, Xu, Zhang, Guestrin 2016, arXiv:1604.06174",
      "torch.utils.checkpoint",
      "identical grads; activation memory ∝ √n at ≤ 1 extra forward",
      experiment="mlatlas.experiments.llm.gradient_checkpointing"),
    M("packing", "llm", "Sequence packing — varlen batches without cross-document attention",
      "Krell, Kosec, Perez, Fitzgibbon 2021, arXiv:2107.02027",
      "the padded batch",
      "identical per-token loss and grads; ≥ 1.8× tokens/s on a long-tailed length mix",
      experiment="mlatlas.experiments.llm.packing"),
    M("zero", "llm", "ZeRO — sharded optimizer state, gradients and parameters",
      "Rajbhandari, Rasley, Ruwase, He 2020, arXiv:1910.02054",
      "DDP",
      "measured per-rank state bytes match 2+2+12 bytes/param; stage-3 per-rank memory ≈ 1/N",
      experiment="mlatlas.experiments.llm.zero"),
    M("mtp", "llm", "Multi-token prediction — DeepSeek-V3 MTP modules, self-speculation",
      "Gloeckle et al. 2024, arXiv:2404.19737; DeepSeek-AI 2024, arXiv:2412.19437",
      "transformers MtpModel (DeepSeek-V3 MTP layer); plain greedy decoding",
      "lossless under greedy; ≥ 1.6 tokens per forward",
      experiment="mlatlas.experiments.llm.mtp"),
    M("medusa", "llm", "Medusa — extra decoding heads and tree attention",
      "Cai et al. 2024, arXiv:2401.10774",
      "the paper's equations; plain greedy decoding",
      "lossless under greedy; mean accepted length ≥ 2.3",
      experiment="mlatlas.experiments.llm.medusa"),
    M("kimi-vl", "llm", "Kimi-VL — native-resolution ViT, MLP projector, MoE decoder",
      "Kimi Team 2025, arXiv:2504.07491",
      "transformers DeepseekV3MoE, Qwen2MoeSparseMoeBlock; Kimi_K25VisionModel + projector",
      "tiny VLM learns synthetic visual QA; only k of E experts run per token",
      experiment="mlatlas.experiments.llm.kimi_vl"),
    M("hallucination", "llm", "Hallucination — SelfCheck, FActScore, DoLa",
      "Manakul et al. 2023, arXiv:2303.08896; Min et al. 2023, arXiv:2305.14251; "
      "Chuang et al. 2024, arXiv:2309.03883",
      "DoLa: the paper's equations (pinned transformers has none); scipy JSD; sklearn AUROC",
      "detection AUROC ≥ 0.8; fewer unsupported facts with mitigation",
      experiment="mlatlas.experiments.llm.hallucination"),
    # ---------------------------------------------------------------- attention
    M("flash-attention", "attention", "FlashAttention — tiled attention with online softmax",
      "Dao, Fu, Ermon, Rudra, Ré 2022, arXiv:2205.14135",
      "torch.nn.functional.scaled_dot_product_attention",
      "same output/grads (fp32 ≤1e-5); at N=8192 peak memory ≤ 1/10 of materialised "
      "attention; on a GPU within 10% of SDPA's flash backend",
      experiment="mlatlas.experiments.attention.flash_attention"),
    M("linear-attention", "attention", "Linear attention — kernelised attention as an RNN",
      "Katharopoulos, Vyas, Pappas, Fleuret 2020, arXiv:2006.16236",
      "quadratic form of the same kernel",
      "equal to the quadratic form; ≥ 5× faster than softmax attention at N=16k on CPU",
      experiment="mlatlas.experiments.attention.linear_attention"),
    M("performer", "attention", "Performer — FAVOR+ positive orthogonal random features",
      "Choromanski et al. 2021, arXiv:2009.14794",
      "exact softmax attention",
      "unbiased; approximation error falls as 1/m with m features",
      experiment="mlatlas.experiments.attention.performer"),
    M("transnormer", "attention", "TransNormer — NormAttention and DiagAttention",
      "Qin et al. 2022, arXiv:2210.10340",
      "exact block attention for DiagAttention",
      "bounded gradients vs vanilla linear attention; less attention dilution",
      experiment="mlatlas.experiments.attention.transnormer"),
    # ---------------------------------------------------------------- peft
    M("lora", "peft", "LoRA — low-rank adaptation",
      "Hu et al. 2021, arXiv:2106.09685",
      "peft LoraConfig",
      "identical outputs to peft; adapters load both ways; ≤ 1% trainable params at full "
      "fine-tune quality",
      experiment="mlatlas.experiments.peft.lora"),
    M("prefix-tuning", "peft", "Prefix tuning — trainable key/value prefixes",
      "Li & Liang 2021, arXiv:2101.00190",
      "peft PrefixTuningConfig",
      "identical outputs to peft; learns a task with the base frozen",
      experiment="mlatlas.experiments.peft.prefix_tuning"),
    M("adapter", "peft", "Adapters — Houlsby and Pfeiffer bottlenecks",
      "Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247",
      "a hand-written reference in the test (AdapterHub's adapters needs transformers 4.x)",
      "≈ 3% params within 1 point of full fine-tune",
      experiment="mlatlas.experiments.peft.adapter"),
    # ---------------------------------------------------------------- alignment
    M("dpo", "alignment", "DPO — direct preference optimisation",
      "Rafailov et al. 2023, arXiv:2305.18290",
      "trl's DPO loss",
      "identical loss/grads; preference accuracy and margin rise",
      experiment="mlatlas.experiments.alignment.dpo"),
    M("grpo", "alignment", "GRPO — group relative policy optimisation",
      "Shao et al. 2024, arXiv:2402.03300",
      "trl's GRPO loss",
      "identical loss; no critic ⇒ memory saving vs PPO; reward rises on a verifiable task",
      experiment="mlatlas.experiments.alignment.grpo"),
    # ---------------------------------------------------------------- generative
    M("ddpm", "generative", "DDPM — denoising diffusion probabilistic models",
      "Ho, Jain, Abbeel 2020, arXiv:2006.11239",
      "diffusers.DDPMScheduler",
      "step-by-step equality; learns 2-D mixtures and 8×8 digits",
      experiment="mlatlas.experiments.generative.ddpm"),
    M("ddim", "generative", "DDIM — denoising diffusion implicit models",
      "Song, Meng, Ermon 2021, arXiv:2010.02502",
      "diffusers.DDIMScheduler",
      "step-by-step equality; 50 steps ≈ 1000 DDPM steps in quality",
      experiment="mlatlas.experiments.generative.ddim"),
    M("sde", "generative", "Score SDEs — reverse SDE and probability-flow ODE",
      "Song et al. 2021, arXiv:2011.13456",
      "diffusers.ScoreSdeVeScheduler",
      "reverse SDE and PF-ODE sample the same distribution; PF-ODE likelihood close to the "
      "true density",
      experiment="mlatlas.experiments.generative.sde"),
    M("rectified-flow", "generative", "Rectified flow — straight paths and reflow",
      "Liu, Gong, Liu 2023, arXiv:2209.03003",
      "diffusers.FlowMatchEulerDiscreteScheduler",
      "after reflow 1–2 steps ≈ many steps",
      experiment="mlatlas.experiments.generative.rectified_flow"),
    M("flows", "generative", "Normalizing flows — RealNVP, continuous flows, flow matching",
      "Dinh, Sohl-Dickstein, Bengio 2017, arXiv:1605.08803; Chen et al. 2018, "
      "arXiv:1806.07366; Lipman et al. 2023, arXiv:2210.02747",
      "exact log-det by autograd",
      "exact likelihood; NLL near the true entropy of the toy density",
      experiment="mlatlas.experiments.generative.flows"),
    M("guidance", "generative", "Guidance — classifier and classifier-free",
      "Dhariwal & Nichol 2021, arXiv:2105.05233; Ho & Salimans 2022, arXiv:2207.12598",
      "—",
      "guidance scale trades diversity for class accuracy",
      experiment="mlatlas.experiments.generative.guidance"),
    # ---------------------------------------------------------------- vision
    M("upsampling", "vision", "Upsampling — interpolation, transposed conv, PixelShuffle",
      "Odena, Dumoulin, Olah 2016, Distill; Shi et al. 2016, arXiv:1609.05158",
      "torch ops",
      "identical values and grads; resize-conv has ≥ 10× less Nyquist (checkerboard) energy "
      "than stride-2 transposed conv",
      experiment="mlatlas.experiments.vision.upsampling"),
    M("spp", "vision", "SPP — spatial pyramid pooling",
      "He, Zhang, Ren, Sun 2014, arXiv:1406.4729",
      "adaptive max-pool",
      "identical to adaptive max-pool; trained on mixed sizes it beats one size + resize",
      experiment="mlatlas.experiments.vision.spp"),
    M("deform-conv", "vision", "Deformable convolution v1 and modulated v2",
      "Dai et al. 2017, arXiv:1703.06211; Zhu, Hu, Lin, Dai 2019, arXiv:1811.11168",
      "torchvision.ops.deform_conv2d",
      "identical outputs and grads (incl. offsets, masks); beats plain conv at equal params "
      "on warped digits; ≤ 2× torchvision's C++ op on the CPU",
      experiment="mlatlas.experiments.vision.deform_conv"),
    M("rfcn", "vision", "R-FCN — position-sensitive RoI pooling",
      "Dai, Li, He, Sun 2016, arXiv:1605.06409",
      "torchvision.ops.roi_pool, ps_roi_pool, roi_align",
      "identical ops; mAP@0.5 ≥ 0.8 on synthetic shapes",
      experiment="mlatlas.experiments.vision.rfcn"),
    M("yolo", "vision", "YOLOv1 — detection as grid regression",
      "Redmon, Divvala, Girshick, Farhadi 2016, arXiv:1506.02640",
      "torchvision.ops.nms, pycocotools",
      "mAP@0.5 ≥ 0.8 on synthetic shapes trained on the CPU; faster than a two-stage "
      "detector",
      experiment="mlatlas.experiments.vision.yolo"),
    M("swin", "vision", "Swin Transformer — shifted-window attention",
      "Liu et al. 2021, arXiv:2103.14030",
      "timm / torchvision Swin-T",
      "identical logits on mapped weights; attention FLOPs linear in image size (ViT: "
      "quadratic)",
      experiment="mlatlas.experiments.vision.swin"),
    M("sam", "vision", "SAM — segment anything",
      "Kirillov et al. 2023, arXiv:2304.02643",
      "transformers SamModel",
      "identical masks and IoU scores on mapped weights; a tiny SAM segments the prompted "
      "shape (mIoU >= 0.8) and its 3 masks resolve an ambiguous point",
      experiment="mlatlas.experiments.vision.sam"),
    M("simcc", "vision", "SimCC — keypoints as 1-D x/y classification",
      "Li et al. 2022, arXiv:2107.03332",
      "heatmap baseline",
      "sub-pixel accuracy at lower compute than heatmaps",
      experiment="mlatlas.experiments.vision.simcc"),
    M("associative-embedding", "vision", "Associative embedding — tags for grouping",
      "Newell, Huang, Deng 2017, arXiv:1611.05424",
      "—",
      "groups keypoints into people ≥ 95% on synthetic scenes",
      experiment="mlatlas.experiments.vision.associative_embedding"),
    M("calibration", "vision", "Camera calibration — Zhang's method, stereo extrinsics",
      "Zhang 2000, IEEE TPAMI 22(11):1330-1334",
      "OpenCV calibrateCamera, stereoCalibrate",
      "recovers known intrinsics within 0.5%, reprojection RMS < 0.1 px",
      experiment="mlatlas.experiments.vision.calibration"),
    # ---------------------------------------------------------------- features
    M("tfrecord", "features", "TFRecord — framing, tf.train.Example, sharded streaming",
      "Abadi et al. 2016, arXiv:1603.04467 (TensorFlow); the TFRecord and tf.train.Example "
      "formats (tensorflow.org)",
      "TensorFlow (tf.io.TFRecordWriter, tf.data.TFRecordDataset)",
      "byte-identical to TF's writer; reads TF's files; corruption raises a clear error",
      experiment="mlatlas.experiments.features.tfrecord"),
    M("feature-columns", "features", "Feature columns — numeric, bucketized, hashed, crossed",
      "Cheng et al. 2016 (Wide & Deep), arXiv:1606.07792; TensorFlow feature columns",
      "tf.compat.v1.feature_column.input_layer",
      "identical outputs to TF's input layer",
      experiment="mlatlas.experiments.features.feature_columns"),
)
del M

_BY_ID = {m.id: m for m in METHODS}
assert len(_BY_ID) == len(METHODS), "duplicate method id in the catalog"
assert all(m.field in FIELDS for m in METHODS), "a method names an unknown field"


def get(method_id: str) -> Method:
    """Return the catalog row for ``method_id``.

    Raises:
        UnknownMethodError: if the id is not in the catalog; ``suggestions`` holds the
            closest ids.
    """
    try:
        return _BY_ID[method_id]
    except KeyError:
        contains = [i for i in _BY_ID if method_id and method_id in i]  # "flash"
        close = difflib.get_close_matches(method_id, list(_BY_ID), n=3, cutoff=0.5)
        raise UnknownMethodError(method_id, list(dict.fromkeys(contains + close))[:3]) from None


def by_field(field: str | None = None) -> list[Method]:
    """Rows of one field (all rows when ``field`` is None), in catalog order.

    Raises:
        ValueError: if ``field`` is not one of :data:`FIELDS`.
    """
    if field is None:
        return list(METHODS)
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; expected one of {', '.join(FIELDS)}")
    return [m for m in METHODS if m.field == field]
