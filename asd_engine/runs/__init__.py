"""Distillation runs: the step loop and exact checkpoints shared by 2D and 3D (:mod:`.base`, :mod:`.checkpoint`),
the 2D and 3D runs (:mod:`.distill_2d`, :mod:`.text_to_3d`), and :mod:`.plan`, the one way the CLI and the nodes
describe, build, train and reload a run."""
