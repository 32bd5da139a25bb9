"""SSFL on Flower (``flwr``, Message API): the same algorithm code as the in-process simulator.

* ``ssfl.flower.server_app:app``: the ServerApp (mask round, then sparse FedAvg rounds);
* ``ssfl.flower.client_app:app``: the ClientApp, which moves each message to the node's handlers
  (``ssfl.flower.node``: saliency scores, mask, masked training), in its own process or in the
  SuperNode's persistent worker (``ssfl.flower.worker``, node config ``worker=true``);
* ``ssfl.flower.protocol``: message types, how payload bytes ride in Flower records, and the
  mapping between Flower run-config keys and :class:`ssfl.config.Config`;
* ``python -m ssfl.flower.local``: a local deployment (SuperLink + N SuperNodes on loopback).

The Flower app definition (``pyproject.toml`` with ``[tool.flwr.app]``) is in ``flower_app/`` at
the repository root; ``docs/flower.md`` explains how to run it.
"""
