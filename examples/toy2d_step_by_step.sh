#!/usr/bin/env bash
# The toy2d pipeline one command at a time (what `dmdctl demo` does), about 2 minutes on 2 CPU cores.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE DMDCTL_THREADS=1   # small MLPs: one thread is faster here

dmdctl train-teacher toy2d --out runs/teacher
dmdctl make-pairs --teacher-path runs/teacher/teacher.safetensors --num-pairs 128 --out runs/pairs
dmdctl distill --config examples/distill_toy2d.toml
dmdctl eval-fid --teacher-path runs/teacher/teacher.safetensors --steps 18 --json runs/fid_teacher.json
dmdctl eval-fid --generator runs/dmd/generator.safetensors --json runs/fid_dmd.json
dmdctl export runs/dmd -o runs/toy2d_generator.safetensors
dmdctl sample --generator runs/toy2d_generator.safetensors --num 3000 --out runs/samples
