"""From vendor packages to a fleet: read a target from its kernel packages, then sign, package (rpm, deb,
DKMS), install, load at boot and report status for the generated modules."""
