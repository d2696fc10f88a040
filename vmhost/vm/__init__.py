"""What drives one QEMU: its state, argv, process, QMP session, stop chain, console, agent."""
