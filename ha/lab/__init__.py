"""The namespace lab: the cluster on one machine (see ``sipha lab --help``).

``sipha lab up [cluster.yaml]`` builds, from the model (default ``examples/lab.yaml``):

* a bridge (``lab.bridge``) in its own network namespace ``sipha-br``, so the host gets no lab address;
* one network namespace ``sipha-<host>`` per node, the witness and the client, each with ``eth0`` on the bridge;
* for the nodes and the witness, their own PID, mount, UTS and IPC namespaces with ``ha.lab.init`` as PID 1:
  private /etc/corosync, /var/lib/corosync, /var/lib/pacemaker, /var/log/{pacemaker,corosync,zookeeper},
  /etc/sipha, /etc/hosts and the ZooKeeper data dir (from ``/var/tmp/sipha-lab/<host>/root``), tmpfs on /run,
  /tmp and /dev/shm; nodes run corosync, corosync-qdevice, pacemakerd and ZooKeeper, the witness runs
  corosync-qnetd and the third ZooKeeper member;
* the supervisor (``ha.lab.supervisor``), the lab's hypervisor: it owns the inits and powers hosts off and on
  for ``sipha lab kill/start`` and for the fence agent ``fence_sipha_lab`` (protocol in its docstring);
* the rendered corosync.conf, a fresh authkey, zoo.cfg + myid and kamailio.cfg in each host, and the rendered
  CIB pre-seeded as /var/lib/pacemaker/cib/cib.xml (no .sig), so the cluster starts with it.

Where a part is not installed yet the lab says so and adapts (``ha.lab.lab._lab_cib``): an ``ocf:sipha:*``
agent that is missing is left out of the lab CIB (the lab then starts Kamailio itself), a missing fence agent
turns stonith off. ``sipha lab up --stock`` builds the baseline instead (``ha.lab.stock``).

Everything the lab makes is recorded in ``/run/sipha-lab/lab.json``; ``sipha lab down`` removes exactly that.
"""
