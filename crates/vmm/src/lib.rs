//! hearth-vmm (to be filled)
