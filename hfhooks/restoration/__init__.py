"""Layer restoration: ``restore_layers`` (``restore``: put decoder layers back to reference weights, in memory or
as a streamed checkpoint edit), the CRC proxy and range search (``search``: ``search_restoration``), and
``LayerRestorationCallback`` (``callback``)."""
