"""The health service: SIP OPTIONS probes of the local proxy, the ``sipha-health`` node attribute Pacemaker's
VIP location rule reads, a REST API with metrics, and SNMP traps/GET (SIPHA-MIB).

Floors inside the package (a module imports only those above it in this list): ``probe`` (pure decision +
probe I/O), ``cluster`` (Pacemaker/kernel commands), ``metrics``, ``snmp``, ``service`` (the loop), ``api``,
``cli``.
"""
