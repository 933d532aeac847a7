"""What every callback shares with ``transformers.Trainer``: refusals of unsupported setups (``guards``),
metrics that reach ``report_to`` integrations (``reporting``), and callback state in ``checkpoint-N/``
(``state``)."""
