"""Layer restoration: ``restore_layers`` and the range search (``restore``) and ``LayerRestorationCallback``
(``callback``)."""
