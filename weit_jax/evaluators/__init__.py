"""How good generated images are: feature distances (``distances``), the Fashion-MNIST classifier
whose features they use (``feature_classifier``), and sample quality during training
(``sample_quality``). Imports the rectified-flow sampler, never a task or a program."""
