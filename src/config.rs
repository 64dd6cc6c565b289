//! Command line and environment (`STRATA_*`) configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    about = "REST service for VM disks, snapshot trees, clones and templates on qcow2 files"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeConfig>),
    /// Print the OpenAPI document (the one checked in as openapi/openapi.json).
    Openapi,
    /// Manage API tokens in a data directory (also while the service runs there).
    Token(TokenCommand),
    /// Print the table of the scope each operation needs (the README's, as Markdown).
    Scopes,
}

#[derive(Debug, Args)]
pub struct TokenCommand {
    /// The service's data directory.
    #[arg(long, env = "STRATA_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub action: TokenAction,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token and print it (once: only a digest of it is kept).
    Create {
        /// Unique among tokens not revoked; jobs record it as `requested_by`.
        #[arg(long)]
        name: String,
        /// read, operate or admin.
        #[arg(long)]
        scope: String,
        /// Lifetime, e.g. 90m, 12h, 30d (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List the tokens (never their secrets).
    List,
    /// Revoke the token named NAME: refused at once, also by a running service.
    Revoke { name: String },
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "STRATA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the database (strata.db) and the image files (volumes/); created
    /// if missing.
    #[arg(long, env = "STRATA_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Jobs that may run at once (jobs of one VM always run one after another).
    #[arg(long, env = "STRATA_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Largest disk size accepted, in bytes (default 16 TiB).
    #[arg(long, env = "STRATA_MAX_DISK_SIZE", default_value_t = 16 << 40)]
    pub max_disk_size: u64,

    /// Free space, in bytes, that a merge must leave on the data file system.
    #[arg(long, env = "STRATA_RESERVED_SPACE", default_value_t = 256 << 20)]
    pub reserved_space: u64,

    /// The qemu-img binary.
    #[arg(long, env = "STRATA_QEMU_IMG", default_value = "qemu-img")]
    pub qemu_img: PathBuf,

    /// Longest a single data-copying qemu-img call (commit, rebase) may run, in seconds.
    #[arg(long, env = "STRATA_COPY_TIMEOUT", default_value_t = 24 * 3600)]
    pub copy_timeout_secs: u64,

    /// Longest an HTTP request may take, in seconds (long-polls wait at most 60).
    #[arg(long, env = "STRATA_REQUEST_TIMEOUT", default_value_t = 90)]
    pub request_timeout_secs: u64,

    /// Largest JSON request body, in bytes.
    #[arg(long, env = "STRATA_BODY_LIMIT", default_value_t = 1 << 20)]
    pub body_limit: usize,

    /// Serve every request without authentication, even on a non-loopback address
    /// (logged as a warning at start). Without it, a non-loopback address needs a token
    /// to exist (`strata token create`).
    #[arg(long, env = "STRATA_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Origins allowed to call the API from a browser (repeat the flag, or `*`).
    #[arg(
        long = "cors-origin",
        env = "STRATA_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// Seconds to let running jobs reach a step boundary on shutdown before the process
    /// exits (interrupted jobs resume at the next start).
    #[arg(long, env = "STRATA_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Seconds between sweeps that prune expired snapshots and those outside their
    /// schedule's retention policy.
    #[arg(long, env = "STRATA_SWEEP_INTERVAL", default_value_t = 60)]
    pub sweep_interval_secs: u64,

    /// Directory the QMP and guest-agent sockets of running VMs must lie in
    /// (`PATCH /v1/vms/{id}` with `qmp_socket`); live operations are off when unset.
    #[arg(long, env = "STRATA_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Longest wait, in seconds, for a guest agent to freeze the guest's file systems
    /// before a live snapshot (bounds the read of the answer itself); a freeze that
    /// takes longer fails, and the guest is thawed.
    #[arg(long, env = "STRATA_FREEZE_TIMEOUT", default_value_t = 60)]
    pub freeze_timeout_secs: u64,

    /// Directory whose files `POST /v1/templates/import?path=` may import (off when
    /// unset).
    #[arg(long, env = "STRATA_IMPORT_DIR")]
    pub import_dir: Option<PathBuf>,

    /// Image imports inspected or converted at once (each qemu-img run on an untrusted
    /// file is CPU- and memory-capped; this caps how many run together). An upload
    /// that finds every slot taken is refused with 503 `imports_busy` and Retry-After.
    #[arg(long, env = "STRATA_IMPORT_SLOTS", default_value_t = 2)]
    pub import_slots: usize,

    /// Largest image file an import accepts, in bytes (default 64 GiB).
    #[arg(long, env = "STRATA_IMPORT_MAX_BYTES", default_value_t = 64 << 30)]
    pub import_max_bytes: u64,

    /// Events kept for clients of /v1/events that reconnect (`Last-Event-ID`); one
    /// resuming from an older event is told to reload.
    #[arg(long, env = "STRATA_EVENT_HISTORY", default_value_t = 4096)]
    pub event_history: usize,

    /// Runs kept in each schedule's history; older ones are forgotten.
    #[arg(long, env = "STRATA_RUN_HISTORY", default_value_t = 200)]
    pub run_history: u32,

    /// Milliseconds between scheduler ticks (finding due schedules is one indexed
    /// query, so a short tick costs little).
    #[arg(
        long,
        env = "STRATA_SCHEDULER_TICK_MS",
        default_value_t = 1000,
        hide = true
    )]
    pub scheduler_tick_ms: u64,

    /// Test-only clock: a file holding an RFC 3339 instant read as "now" (see `clock`).
    #[arg(long, env = "STRATA_CLOCK_FILE", hide = true)]
    pub clock_file: Option<PathBuf>,

    /// Test-only crash injection: `<job kind>:<point>` aborts the process there.
    #[arg(long, env = "STRATA_FAULT", hide = true)]
    pub fault: Option<String>,

    /// Test-only check of the read model: every view served from memory is rendered
    /// again from the database, writes held meanwhile, and a difference is a 500
    /// `read_model_diverged` (slow: the test suite runs with it).
    #[arg(long, env = "STRATA_VERIFY_READS", hide = true)]
    pub verify_reads: bool,
}
