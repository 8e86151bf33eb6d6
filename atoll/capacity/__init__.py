"""What a run will cost before anything is rented: parameters, FLOPs, memory, bytes and time."""
