//! hearth-control (to be filled)
