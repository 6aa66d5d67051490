"""Distillation training: the DMD trainer and its run loop, checkpoints, trackers and the speed
levers of the step."""
