"""``dmdctl eval-fid``: Fréchet distance, KID and precision/recall of a generator, a teacher's
sampler or a folder of images against reference statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmdctl.config import Settings
from dmdctl.errors import require
from dmdctl.options import option
from dmdctl.settings.common import (
    GENERATOR_HELP,
    check_guide_net,
    device_option,
    guidance_option,
    guide_mode_option,
    guide_net_option,
    teacher_option,
    teacher_path_option,
)

EVAL_SEED_START = 1_000_000  # far from make-pairs' default seeds: never score the training noise
FEATURES = ("auto", "native", "inception", "dinov2")
PROTOCOLS = ("edm", "clean")


@dataclass
class EvalFidConfig(Settings):
    """Settings of ``eval-fid``: what is scored (one of a generator, a teacher's sampler, a
    folder of images, two statistics files, or a reference to make), how, and against what."""

    generator: str | None = option(None, GENERATOR_HELP, path=True, panel="Inputs")
    teacher: str | None = teacher_option()
    teacher_path: str | None = teacher_path_option()
    steps: int = option(
        18,
        "Heun steps when scoring the teacher's sampler (1 = one Euler step).",
        min=1,
        panel="Sampling",
    )
    guide_net: str | None = guide_net_option()
    guide_mode: str = guide_mode_option()
    guidance: float = guidance_option()
    num_samples: int = option(10000, "Samples to score.", min=2, panel="Sampling")
    seed: int = option(
        EVAL_SEED_START, "First seed of the scored samples.", min=0, panel="Sampling"
    )
    batch_size: int = option(1000, "Generation batch size.", min=1, panel="Sampling")
    images: str | None = option(
        None,
        "Score a folder of images (searched recursively) instead of a generator.",
        path=True,
        panel="Inputs",
    )
    make_ref: str | None = option(
        None,
        "Make reference statistics of a folder of images or an ADM-style npz (arr_0, NHWC "
        "uint8); needs -o.",
        path=True,
        panel="Inputs",
    )
    stats: str | None = option(
        None,
        "Statistics npz to compare with --ref (no features are computed).",
        path=True,
        panel="Inputs",
    )
    ref: str | None = option(
        None,
        "Reference statistics npz (mu, sigma), or an EDM2 reference pickle (img512.pkl, read "
        "as data: its fid or fd_dinov2 entry); default: the teacher's built-in reference.",
        path=True,
        panel="Evaluation",
    )
    out: str | None = option(
        None,
        "Write the statistics (mu, sigma, KID features) of what was scored here.",
        path=True,
        flags=("--out", "-o"),
        panel="Output",
    )
    features: str = option(
        "auto",
        "auto (a built-in teacher's own features; Inception for images), native, inception, or "
        "dinov2 (FD-DINOv2, EDM2's second metric; needs --dinov2 DIR).",
        choices=FEATURES,
        panel="Evaluation",
    )
    protocol: str = option(
        "edm",
        "How images reach Inception: edm (EDM/ADM, TF1 bilinear) or clean (COCO-30k: crop, "
        "LANCZOS 256, clean-fid resize).",
        choices=PROTOCOLS,
        panel="Evaluation",
    )
    inception_weights: str | None = option(
        None,
        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: looked for in "
        "$TORCH_HOME/hub/checkpoints/).",
        path=True,
        panel="Evaluation",
    )
    inception_sha256: str | None = option(
        None,
        "Accept Inception weights with this sha256 instead of the official file's (results are "
        "then not comparable).",
        panel="Evaluation",
    )
    dinov2: str | None = option(
        None,
        "--features dinov2: a local transformers Dinov2Model folder (e.g. a copy of "
        "facebook/dinov2-large, the ViT-L/14 of EDM2's FD-DINOv2); never downloaded.",
        path=True,
        panel="Evaluation",
    )
    inception_batch: int = option(
        64, "Images per Inception forward pass.", min=1, panel="Evaluation"
    )
    offline: bool = option(
        False,
        "Never download (eval-fid never does: Inception weights must be local).",
        panel="Inputs",
    )
    kid: bool = option(
        True,
        "Also report KID (± std over subsets) when the reference holds features (built-in "
        "teachers' training data, or --ref made by --make-ref).",
        panel="Evaluation",
    )
    kid_subsets: int = option(100, "KID: number of random subsets.", min=1, panel="Evaluation")
    kid_subset_size: int = option(
        1000, "KID: subset size (capped at the smaller set).", min=2, panel="Evaluation"
    )
    kid_max_features: int = option(
        10000, "KID: features kept per side (uniform reservoir sample).", min=2, panel="Evaluation"
    )
    precision_recall: bool = option(
        False,
        "Also report precision, recall (k-NN manifolds), density and coverage against the "
        "reference's features (any feature set; --ref files made by --make-ref).",
        flags=("--precision-recall/--no-precision-recall",),
        panel="Evaluation",
    )
    pr_k: int = option(
        3, "Precision/recall: k of the k-nearest-neighbour balls.", min=1, panel="Evaluation"
    )
    bootstrap: int = option(
        0,
        "Rounds of a bootstrap over samples for 95% intervals of KID and precision/recall (0: "
        "none; else at least 10).",
        min=0,
        panel="Evaluation",
    )
    # text-to-image generators: their images for a prompts file, scored in one command
    prompts: str | None = option(
        None,
        "Text-to-image generators: make the generator's images for these prompts (image i: "
        "prompt i mod the count, seed --seed+i; as `sample --prompts`), score them against --ref "
        "(COCO-style: --protocol clean) and, with --clip-model, their CLIP score.",
        path=True,
        panel="Inputs",
    )
    clip_model: str | None = option(
        None,
        "With --prompts: also the CLIP score, with this transformers CLIPModel folder or hub id.",
        panel="Evaluation",
    )
    clip_prefix: str = option(
        "",
        'With --clip-model: text put before every prompt (GigaGAN/DMD2: "A photo depicts ").',
        panel="Evaluation",
    )
    grid: str | None = option(
        None,
        "Also save a PNG grid of the first 100 scored samples here.",
        path=True,
        panel="Output",
    )
    json: str | None = option(None, "Write the result as JSON here.", path=True, panel="Output")
    device: str = device_option()

    def check(self) -> None:
        check_guide_net(self)
        require(
            (self.features == "dinov2") == (self.dinov2 is not None),
            "--features dinov2 and --dinov2 DIR go together (FD-DINOv2 with a local DINOv2 "
            "network; dmdctl never downloads one)",
        )
        require(
            self.dinov2 is None or Path(self.dinov2).is_dir(),
            f"--dinov2 {self.dinov2}: no such folder (a local Dinov2Model folder)",
        )
        require(
            self.features != "dinov2" or self.prompts is None,
            "--features dinov2 is for class-conditional samples and image folders, not --prompts",
        )
        require(
            self.bootstrap == 0 or self.bootstrap >= 10,
            f"--bootstrap must be 0 (no intervals) or at least 10 rounds, got {self.bootstrap}",
        )
        if self.make_ref:
            require(
                not self.precision_recall,
                "--make-ref makes a reference, there is nothing to compare: drop --precision-recall",
            )
        model = (
            self.generator is not None or self.teacher_path is not None or self.teacher is not None
        )
        modes = [m for m, on in [("--stats", self.stats), ("--make-ref", self.make_ref),
                                 ("--images", self.images), ("--generator/--teacher", model)] if on]  # fmt: skip
        require(
            bool(modes),
            "nothing to score: pass --generator FILE, or --teacher-path FILE with --steps N, "
            "or --images FOLDER, --make-ref FOLDER_OR_NPZ -o REF.npz, --stats A.npz --ref B.npz",
        )
        require(len(modes) == 1, f"pass only one of {', '.join(modes)}")
        require(
            not (self.generator and self.teacher_path),
            "pass either --generator or --teacher-path, not both",
        )
        if self.prompts:
            require(
                self.generator is not None,
                "--prompts scores a text-to-image generator: pass --generator FILE",
            )
            require(
                self.ref is not None,
                "--prompts needs --ref STATS.npz of real images (make one with --make-ref "
                "FOLDER --protocol clean -o REF.npz)",
            )
        require(
            self.clip_model is None or self.prompts is not None,
            "--clip-model scores a generator's images for --prompts FILE (for a folder of "
            "images use `dmdctl clip-score`)",
        )
        if self.stats:
            require(self.ref is not None, "--stats A.npz needs --ref B.npz to compare with")
        if self.make_ref:
            require(
                self.out is not None, "--make-ref needs -o REF.npz (where to write the statistics)"
            )
            require(self.ref is None, "--make-ref makes a reference: do not pass --ref")
        if self.images:
            require(
                self.ref is not None, "--images needs --ref STATS.npz (make one with --make-ref)"
            )
        if self.images or self.make_ref:
            require(
                self.features != "native",
                "images are scored with Inception features: drop --features native",
            )


HELP = """Fréchet distance (and KID) of a generator, the teacher's sampler or images to reference statistics.

Example: [bold]dmdctl eval-fid --generator runs/dmd/generator.safetensors --json fid.json[/bold]

ImageNet 64 (EDM protocol): [bold]dmdctl eval-fid --generator gen.safetensors --features inception --ref imagenet-64x64.npz --num-samples 50000[/bold]

References: [bold]dmdctl eval-fid --make-ref val2014/ --protocol clean -o coco.npz[/bold];
two statistics files: [bold]dmdctl eval-fid --stats a.npz --ref b.npz[/bold].
Built-in teachers are scored against their own training data; KID, precision and recall with
95% intervals: [bold]dmdctl eval-fid --generator gen.safetensors --precision-recall --bootstrap 200[/bold].
Multi-GPU: [bold]accelerate launch -m dmdctl eval-fid ...[/bold] (each process scores its share).
"""


SETTINGS = EvalFidConfig
