"""Turn whole-slide H&E images + spatial transcriptomics into sharded training pairs."""
