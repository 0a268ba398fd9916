"""stalign models: image encoder registry, gene encoders (stofm), ABFN fusion, ``STAlign`` and its factory."""
