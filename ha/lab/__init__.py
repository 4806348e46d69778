"""The namespace lab: the cluster on one machine (see ``sipha lab --help``)."""
