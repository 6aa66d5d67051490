"""``dmdctl eval-fid``: see :data:`dmdctl.settings.eval_fid.HELP`."""

from __future__ import annotations

from pathlib import Path

from dmdctl.settings.eval_fid import EvalFidConfig


def run(cfg: EvalFidConfig) -> int | None:
    """Run the command on resolved settings (its help: :data:`dmdctl.settings.eval_fid.HELP`)."""
    from dmdctl.metrics.evaluate import evaluate, result_rows
    from dmdctl.runtime import is_main_launch_process
    from dmdctl.ui import print_table, summary_table

    result = score_prompts(cfg) if cfg.prompts else evaluate(cfg, multiprocess=True)
    if is_main_launch_process():
        print_table(summary_table("eval-fid", result_rows(result)))
    return None


def score_prompts(cfg: EvalFidConfig) -> dict:
    """FID (and CLIP score) of a text-to-image generator over a prompts file, in one process:
    its images for the prompts, made as ``sample --prompts`` makes them, are scored as an image
    folder against ``--ref``, and with ``--clip-model`` against their own prompts."""
    import tempfile
    from dataclasses import replace

    from dmdctl.commands.clip_score import clip_score_folder
    from dmdctl.commands.sample import sample
    from dmdctl.errors import require
    from dmdctl.generators import source_from
    from dmdctl.metrics.collect import write_json
    from dmdctl.metrics.evaluate import evaluate
    from dmdctl.metrics.score_source import refuse_video
    from dmdctl.runtime import launched_processes
    from dmdctl.settings.clip_score import ClipScoreConfig
    from dmdctl.settings.sample import SampleConfig

    require(
        launched_processes() == 1,
        "eval-fid --prompts runs in one process; under a launcher make the images with "
        "`dmdctl sample --prompts` and score them with `eval-fid --images`",
    )
    with tempfile.TemporaryDirectory(prefix="dmdctl-eval-") as tmp:
        sample_cfg = SampleConfig(
            generator=cfg.generator, teacher_path=cfg.teacher_path, prompts=cfg.prompts,
            num=cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, out=tmp,
            plot=False, device=cfg.device, offline=cfg.offline,
        )  # fmt: skip
        source = source_from(sample_cfg)
        refuse_video(source.kind)  # before any video is made
        made = sample(sample_cfg, source)
        folder = Path(tmp) / "images"
        scored = replace(cfg, generator=None, teacher_path=None, prompts=None, json=None)
        result = evaluate(replace(scored, images=str(folder)))
        if cfg.clip_model is not None:
            clip = clip_score_folder(
                ClipScoreConfig(
                    images=str(folder), prompts=str(Path(tmp) / "images.jsonl"),
                    clip_model=cfg.clip_model, prefix=cfg.clip_prefix, batch_size=cfg.batch_size,
                    device=cfg.device, offline=cfg.offline,
                )
            )  # fmt: skip
            result.update({k: v for k, v in clip.items() if k.startswith("clip_score")})
            result["clip_model"] = cfg.clip_model
    result.update(source=f"generator {Path(cfg.generator).name}", prompts=cfg.prompts)
    result["num_samples"] = made.get("num", result.get("num_samples"))
    write_json(cfg, result)
    return result
