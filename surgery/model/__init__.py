"""The model layer: the one place that loads models and tokenizers, knows each architecture's
layout, encodes prompts and scores next tokens. Everything that touches a transformers model
goes through here."""
