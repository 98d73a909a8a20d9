"""The model and its training: the encoder classifier, the training loop, distillation, evaluation."""
