"""Rebuild the shipped digits assets: the feature classifier and the teacher.

    OMP_WAIT_POLICY=PASSIVE DMDCTL_THREADS=2 python scripts/make_digits_assets.py [--classifier-only]

Writes src/dmdctl/assets/{digits_features,digits_teacher}.safetensors and PROVENANCE.json
(commands, seeds, sha256, held-out accuracy, wall time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmdctl.files import sha256_file
from dmdctl.teachers.digits import (
    ASSETS,
    FEATURES_FILE,
    PROVENANCE_FILE,
    TEACHER_FILE,
    train_classifier,
)

TEACHER_CMD = ["dmdctl", "train-teacher", "digits", "--seed", "0"]  # run as python -m dmdctl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifier-only", action="store_true")
    ap.add_argument("--teacher-only", action="store_true")
    args = ap.parse_args()
    ASSETS.mkdir(parents=True, exist_ok=True)
    prov = json.loads(PROVENANCE_FILE.read_text()) if PROVENANCE_FILE.is_file() else {}
    if not args.teacher_only:
        t0 = time.time()
        result = train_classifier(FEATURES_FILE)
        prov["digits_features.safetensors"] = {
            "command": "python scripts/make_digits_assets.py --classifier-only",
            "function": "dmdctl.teachers.digits.train_classifier",
            **result,
            "seconds": round(time.time() - t0, 1),
            "sha256": sha256_file(FEATURES_FILE),
        }
        print("classifier:", prov["digits_features.safetensors"])
    if not args.classifier_only:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([sys.executable, "-m", *TEACHER_CMD, "--out", tmp], check=True)
            shutil.copyfile(Path(tmp) / "teacher.safetensors", TEACHER_FILE)
            prov["digits_teacher.safetensors"] = {
                "command": " ".join(TEACHER_CMD + ["--out", "DIR"]),
                "config": (Path(tmp) / "config.toml").read_text(),
                "seconds": round(time.time() - t0, 1),
                "sha256": sha256_file(TEACHER_FILE),
            }
    PROVENANCE_FILE.write_text(json.dumps(prov, indent=2) + "\n")
    print("wrote", PROVENANCE_FILE, file=sys.stderr)


if __name__ == "__main__":
    main()
