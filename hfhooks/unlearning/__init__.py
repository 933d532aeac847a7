"""Saliency-based unlearning: forgetting objectives and SalUn (``objectives``), evaluation (``evaluation``), and
the Trainer adapters ``SaliencyUnlearningCallback`` (``callback``) and ``UnlearningEvalCallback``
(``eval_callback``)."""
