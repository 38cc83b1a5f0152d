"""The recipe: the nets, the data on the device, the step, the optimizers, the schedule."""
