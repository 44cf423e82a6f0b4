"""The model layer: the shared preprocessing (transforms), the networks, training, evaluation,
compressed variants, explanations and the drift reference a model registers with."""
