"""How the cloud gets its updates: fine-tuning topologies, chosen by the sync policy's ``topology``.

A topology is a class registered in :data:`TOPOLOGIES` under the name a
:class:`cloudedge.finetune.sync.SyncPolicy` gives in its ``topology`` class attribute:

- ``two_tier`` (:class:`TwoTier`): devices exchange with the cloud directly; no edge tier.
- ``barrier`` (:class:`Barrier`): every edge runs its period of edge rounds; the cloud waits for
  all of them and aggregates.
- ``autonomous`` (:class:`AutonomousMerges`): no barrier; each edge merges into the global model
  when its policy decides, and pulls the new global model right away.

Each one does one cloud update per :meth:`Topology.step` with the shared pieces of its run (a
:class:`cloudedge.finetune.loop.HierFinetune`): edge rounds (``run.rounds``), messages
(``run.messages``), safeguards (``run.safeguards``), the server optimizer (``run.apply_server``)
and the metric rows (``run.log_update``). A new topology is one class in one module, registered
with ``@TOPOLOGIES.register("name")``, and a policy that names it.
"""

# Importing the modules registers the built-in topologies.
from cloudedge.finetune.topologies.autonomous import AutonomousMerges
from cloudedge.finetune.topologies.barrier import Barrier
from cloudedge.finetune.topologies.base import TOPOLOGIES, Topology
from cloudedge.finetune.topologies.two_tier import TwoTier

__all__ = ["TOPOLOGIES", "AutonomousMerges", "Barrier", "Topology", "TwoTier"]
