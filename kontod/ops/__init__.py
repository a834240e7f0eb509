"""How people and machines watch and steer kontod: health, metrics, HTTP, the status page,
pings, suspicion and systemd. It renders what any job declares and never names a job."""
