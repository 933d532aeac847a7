"""The pieces every method stands on, with no Trainer in sight.

* ``names`` — canonical parameter names through DDP / compile / PEFT / FSDP wrappers, name patterns;
* ``blocks`` — the transformer block list of a model and layer selections;
* ``params`` — ``ParamIndex``: canonical names resolved to live parameters, include / exclude / layers selection;
* ``layers`` — MLP units and attention heads of a layer as ``{name: (axis, indices)}`` slices;
* ``hooks`` — the hook lifecycle every mechanism registers through (census, one-call removal, crash clean-up);
* ``loss_hooks`` — replacing or extending a model's loss from hooks, scaled as the Trainer expects;
* ``data`` — side labels (routing, unlearn, rationale) that survive a stock Trainer's collation;
* ``config`` — the base of the config dataclasses.
"""
