"""Input pipeline: LLaVA-format records -> tokenised, preprocessed, m-sampled batches."""
