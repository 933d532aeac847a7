"""The pieces every method stands on, with no Trainer in sight.

* ``params`` — canonical parameter names through DDP / compile / PEFT / FSDP wrappers, ``ParamIndex``;
* ``layers`` — decoder layers, MLP units and attention heads as ``{name: (axis, indices)}`` slices;
* ``hooks`` — the hook lifecycle every mechanism registers through (census, one-call removal, crash clean-up);
* ``loss_hooks`` — replacing or extending a model's loss from hooks, scaled as the Trainer expects;
* ``data`` — side labels (routing, unlearn, rationale) that survive a stock Trainer's collation;
* ``config`` — the base of the config dataclasses.
"""
