"""The run: everything between a resolved config and a finished run folder.

`train.run_experiment` is the entry point; `experiment` builds what a run is made of (data,
model, optimizer, tracker, restored checkpoint); `evaluation`, `discrepancy` and
`precise_bn` measure it; `checkpoint`, `guard`, `distributed`, `precision`, `optim`,
`tracking`, `dashboards` and `meters` each keep one concern of the loop.
"""
