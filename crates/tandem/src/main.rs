//! `tandem`: the one binary of Tandem, for operators, hosts and the nodes themselves.
//! Its subcommands and flags are the contract of ../../shared/design/INTERFACE.md.

mod agent;
mod client;
mod copy;
mod hosts;
mod local;
mod reserve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tandem_types::NodeId;
use tandem_types::{Layer, TransportKind};

#[derive(Parser)]
#[command(name = "tandem", version, about = "Tandem: a distributed block-storage cluster with synchronous replication")]
struct Cli {
    /// Log output format (the level comes from RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How admin commands find the cluster.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// A data dir made by `tandem up` (default ./tandem-data).
    #[arg(long, global = true)]
    cluster: Option<PathBuf>,
    /// Any node's API, e.g. http://127.0.0.1:7201 (takes precedence over --cluster).
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// A file holding the API token to send (else $TANDEM_TOKEN, else the cluster dir's
    /// admin.token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

impl Target {
    /// The data dir of a local cluster: `--cluster`, else the default.
    fn dir(&self) -> PathBuf {
        self.cluster.clone().unwrap_or_else(|| PathBuf::from(tandem_client::DEFAULT_DIR))
    }

    /// The bearer token API requests carry: `--token-file`, else `$TANDEM_TOKEN`, else the
    /// admin token in the cluster's data dir.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", f.display()))?;
            return Ok(Some(t.trim().to_string()));
        }
        if let Ok(t) = std::env::var("TANDEM_TOKEN") {
            if !t.trim().is_empty() {
                return Ok(Some(t.trim().to_string()));
            }
        }
        Ok(tandem_client::read_admin_token(&self.dir()))
    }

    /// A client of the API at `base`, carrying the token.
    pub fn api(&self, base: &str) -> anyhow::Result<tandem_client::Api> {
        Ok(tandem_client::Api::new(base).with_token(self.token()?))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local cluster: certificates, config and N node processes on 127.0.0.1.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value = "tandem-data")]
        dir: PathBuf,
        /// The network layer node-to-node traffic starts on (a new cluster; switch a running
        /// one with `tandem transport set`).
        #[arg(long, value_parser = parse_transport)]
        transport: Option<TransportKind>,
        /// Return once the cluster has a leader, leaving the nodes running.
        #[arg(long)]
        detach: bool,
    },
    /// Stop a local cluster started with `up --detach`.
    Down {
        #[arg(long, default_value = "tandem-data")]
        dir: PathBuf,
    },
    /// Run one node (`--config FILE --id ID`), or change the membership (`add`, `remove`).
    Node(NodeCmd),
    /// Operators' credentials.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Members, leader, term, log indexes, and per node its role and addresses.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Cluster-wide settings kept in the metadata store.
    Setting {
        #[command(subcommand)]
        cmd: SettingCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Datasets (pods): groups of volumes replicated on the same nodes, failing over together.
    Dataset {
        #[command(subcommand)]
        cmd: DatasetCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Volumes: block devices, replicated synchronously on their dataset's nodes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
        #[command(flatten)]
        target: Target,
    },
    /// The node-to-node transport: switch it live, or show every link.
    Transport {
        #[command(subcommand)]
        cmd: TransportCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Hosts: the machines that attach volumes, the site each is in and the volumes each may
    /// reach; `tandem host agent` runs on a host.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
        #[command(flatten)]
        target: Target,
    },
    /// A host's path map, like `multipath -ll`: per volume, every path (a node's NBD address),
    /// its state (active-optimized, active-non-optimized, unavailable) and why.
    Paths {
        /// The host whose map to show.
        #[arg(long)]
        host: String,
        /// Only this volume's paths.
        #[arg(long)]
        volume: Option<String>,
        /// Keep following the map: print each new generation as it is published (with --json,
        /// one JSON document per line), failing over between nodes, until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// The map as one JSON document (with --watch, one per line).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Persistent reservations of a volume, whole or by byte range (SCSI-3 style: register a
    /// key, reserve, release, preempt, clear; and move a range reservation), made for a host.
    Reserve {
        #[command(subcommand)]
        cmd: ReserveCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Copy tokens: a token stands for ranges of a volume as they are when it is made; `tandem
    /// copy` writes its data into a volume by reference.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Write a token's data into a volume: by reference (metadata only) on every replica when
    /// they hold it, streamed otherwise.
    Copy {
        /// The token's value (hex, as `tandem token create` printed it).
        #[arg(long)]
        token: String,
        /// The volume to write into.
        #[arg(long)]
        to: String,
        /// Where in that volume (bytes; K, M, G, T suffixes).
        #[arg(long, value_parser = tandem_client::parse_size)]
        offset: u64,
        /// Where in the token's data to start.
        #[arg(long, value_parser = tandem_client::parse_size, default_value = "0")]
        token_offset: u64,
        /// How much (default: the rest of the token's data).
        #[arg(long, value_parser = tandem_client::parse_size)]
        length: Option<u64>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Read-only snapshots of volumes, made by reference; exported over NBD and iSCSI like
    /// volumes.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Benchmarks, each beside its reference in the same run.
    Bench {
        #[command(subcommand)]
        cmd: tandem_bench::BenchCmd,
    },
    /// The chaos suite: nemeses against real nodes in network namespaces, a checker, and a
    /// report with a timeline picture (docs/CHAOS.md).
    Chaos {
        #[command(subcommand)]
        cmd: tandem_chaos::cli::ChaosCmd,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeCmd {
    #[command(subcommand)]
    sub: Option<NodeSub>,
    /// The cluster config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Which of its nodes to run.
    #[arg(long)]
    id: Option<NodeId>,
}

#[derive(Subcommand)]
enum NodeSub {
    /// Add a node. With addresses, registers a node that is already running; without, on a
    /// cluster made by `tandem up`, also makes its certificate, config entry and process.
    Add {
        #[arg(long)]
        id: Option<NodeId>,
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        raft_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        api_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        nbd_addr: Option<std::net::SocketAddr>,
        /// The node's iSCSI portal, if it serves iSCSI (with explicit addresses).
        #[arg(long)]
        iscsi_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a node from the cluster (on a local cluster, also stop its process).
    Remove {
        id: NodeId,
        #[command(flatten)]
        target: Target,
    },
    /// The nodes in the cluster map.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum TransportCmd {
    /// Select QUIC or TCP for the data layer (replication, bulk, probe) or the control layer
    /// (Raft). Every link moves make-before-break; nothing in flight is lost or repeated.
    Set {
        #[arg(value_parser = parse_transport)]
        transport: TransportKind,
        #[arg(long, value_parser = parse_layer, default_value = "data")]
        layer: Layer,
    },
    /// Per node and peer link: the transport in use, queue depths, bytes and messages sent,
    /// reconnects and switches.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DatasetCmd {
    /// Create a dataset. Its replicas are spread over the sites, the preferred site first;
    /// its volumes' primaries are in the preferred site when it holds a replica.
    Create {
        name: String,
        /// How many nodes hold a copy of each volume (default: every node).
        #[arg(long)]
        replicas: Option<u32>,
        #[arg(long)]
        preferred_site: Option<String>,
    },
    /// Every dataset: replicas, preferred site, volumes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a dataset that has no volumes.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// An API token for operator NAME (role admin), printed on stdout. With --secret it is
    /// minted here from the cluster secret file (to bootstrap a cluster no admin can reach yet);
    /// without, an admin asks the cluster for it.
    Credentials {
        #[arg(long, default_value = "admin")]
        name: String,
        #[arg(long)]
        secret: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Add a host in a site (adding it again sets its site). Paths in its site are preferred.
    Add {
        name: String,
        #[arg(long)]
        site: String,
        /// An iSCSI initiator name of the host (repeatable): its sessions get the host's path
        /// states. Given again, the names replace the host's names; left out, they stay.
        #[arg(long)]
        iqn: Vec<String>,
    },
    /// Let a host reach a volume: the volume's paths join the host's path map.
    Connect { name: String, volume: String },
    /// Take a volume out of a host's path map.
    Disconnect { name: String, volume: String },
    /// Issue the host new credentials and write them to DIR: its client certificate and key
    /// (NBD over TLS; the file names qemu's and libnbd's TLS settings expect), the CA's
    /// certificate and its API token. Its old certificate and token stop working.
    Credentials {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Also give the host's iSCSI initiators CHAP: a new random secret (user: the host's
        /// name), written to DIR/chap; its initiators must then log in with it.
        #[arg(long)]
        chap: bool,
        /// As --chap, and mutual: the target proves itself to the initiator with a secret of
        /// its own.
        #[arg(long)]
        mutual_chap: bool,
    },
    /// Remove a host and its path map.
    Remove { name: String },
    /// Every host: site, the volumes it reaches, the generation of its path map.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Run the host agent until SIGINT or SIGTERM: probe every path of the host's map each
    /// interval (NBD greeting), report the results to the cluster, and follow the map, writing
    /// each new generation to the map file atomically.
    Agent {
        /// The host this agent runs on (as added with `tandem host add`).
        #[arg(long)]
        host: String,
        /// How often every path is probed, in milliseconds.
        #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
        interval_ms: u64,
        /// A path that has not sent its NBD greeting within this many milliseconds failed.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        probe_timeout_ms: u64,
        /// Where the path map is kept (default: tandem-paths-HOST.json in the current dir).
        #[arg(long)]
        map_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ReserveCmd {
    /// Register the host's key (REGISTER AND IGNORE EXISTING KEY; with --current, REGISTER,
    /// which checks the key held now). --key 0 unregisters.
    Register {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Reserve the volume, or with --range a byte range of it, with --type.
    Reserve {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Release the host's reservation (of the volume, or of exactly --range).
    Release {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Remove the registrations of --victim and take over its reservation (or its reservation
    /// of exactly --range), with --type; --abort also ends its commands in progress.
    Preempt {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Remove every registration and reservation (with --range: every range reservation that
    /// overlaps it).
    Clear {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Move the host's reservation of --range to --to, in one step.
    Move {
        volume: String,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// The volume's registrations, its reservation and its range reservations.
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct ReserveOpts {
    /// The host the command is made for.
    #[arg(long)]
    pub host: String,
    /// The host's reservation key (decimal or 0x hex); for register, the key to register.
    #[arg(long)]
    pub key: String,
    /// register: the key the host holds now (checked).
    #[arg(long)]
    pub current: Option<String>,
    /// The reservation type: we, ea, we-ro, ea-ro, we-ar, ea-ar (write-exclusive,
    /// exclusive-access, registrants-only, all-registrants).
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// A byte range START:LEN.
    #[arg(long)]
    pub range: Option<String>,
    /// move: the byte range START:LEN to move the reservation to.
    #[arg(long)]
    pub to: Option<String>,
    /// preempt: the key to preempt.
    #[arg(long)]
    pub victim: Option<String>,
    /// preempt: also abort the victim's commands in progress.
    #[arg(long)]
    pub abort: bool,
    /// register: activate persist through power loss (reported; reservations are kept in Raft
    /// either way).
    #[arg(long)]
    pub aptpl: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token for a range of a volume; prints its value (1024 hex digits).
    Create {
        volume: String,
        #[arg(long, value_parser = tandem_client::parse_size)]
        offset: u64,
        #[arg(long, value_parser = tandem_client::parse_size)]
        length: u64,
        /// Its maximum lifetime, in seconds (default 3600).
        #[arg(long = "ttl")]
        lifetime: Option<u64>,
        /// Its inactivity timeout, in seconds (default 600, at most the lifetime).
        #[arg(long)]
        idle: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// The tokens of a volume (their values are not shown again).
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it can no longer be used, and its data is released.
    Revoke { volume: String, id: u64 },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot VOLUME as NAME (read-only, by reference: no data is copied).
    Create { volume: String, name: String },
    /// Every snapshot (of VOLUME only, if given).
    List {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (in the `default` dataset, on every node, unless --dataset says).
    Create {
        name: String,
        /// Bytes, or with a suffix K, M, G or T (powers of 1024): 64M, 1G. A multiple of 4096.
        #[arg(long, value_parser = tandem_client::parse_size)]
        size: u64,
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Every volume: size, dataset, primary, in-sync set, epoch, resync progress.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume.
    Delete { name: String },
    /// Make NEW a writable clone of SRC, by reference (no data is copied; NEW has SRC's
    /// replicas and size).
    Clone { src: String, new: String },
}

fn parse_transport(s: &str) -> Result<TransportKind, String> {
    s.parse()
}

fn parse_layer(s: &str) -> Result<Layer, String> {
    s.parse()
}

#[derive(Subcommand)]
enum SettingCmd {
    Set {
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"))
        // The API's audit lines (who changed what, who was refused) are written whatever the
        // level asked for.
        .add_directive("audit=info".parse().expect("a valid directive"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up { nodes, dir, transport, detach } => local::up(&dir, nodes, transport, detach, cli.log_format).await,
        Cmd::Down { dir } => local::down(&dir).await,
        Cmd::Node(NodeCmd { sub: None, config, id }) => {
            let (Some(config), Some(id)) = (config, id) else {
                anyhow::bail!("`tandem node` needs --config FILE and --id ID (or a subcommand: add, remove, list)");
            };
            local::run_node(&config, id).await
        }
        Cmd::Node(NodeCmd { sub: Some(sub), .. }) => match sub {
            NodeSub::Add { id, site, raft_addr, api_addr, nbd_addr, iscsi_addr, target } => {
                local::node_add(&target, id, site, raft_addr, api_addr, nbd_addr, iscsi_addr, cli.log_format).await
            }
            NodeSub::Remove { id, target } => local::node_remove(&target, id).await,
            NodeSub::List { json, target } => client::node_list(&target, json).await,
        },
        Cmd::Status { json, target } => client::status(&target, json).await,
        Cmd::Admin { cmd: AdminCmd::Credentials { name, secret }, target } => {
            client::admin_credentials(&target, &name, secret.as_deref()).await
        }
        Cmd::Setting { cmd, target } => client::setting(&target, cmd).await,
        Cmd::Dataset { cmd, target } => client::dataset(&target, cmd).await,
        Cmd::Volume { cmd, target } => client::volume(&target, cmd).await,
        Cmd::Transport { cmd, target } => client::transport(&target, cmd).await,
        Cmd::Host { cmd: HostCmd::Agent { host, interval_ms, probe_timeout_ms, map_file }, target } => {
            let opts = agent::AgentOpts {
                host,
                interval: std::time::Duration::from_millis(interval_ms),
                probe_timeout: std::time::Duration::from_millis(probe_timeout_ms),
                map_file,
            };
            agent::run(&target, opts).await
        }
        Cmd::Host { cmd, target } => hosts::host(&target, cmd).await,
        Cmd::Paths { host, volume, watch, json, target } => {
            hosts::paths(&target, &host, volume.as_deref(), watch, json).await
        }
        Cmd::Reserve { cmd, target } => reserve::reserve(&target, cmd).await,
        Cmd::Token { cmd, target } => copy::token(&target, cmd).await,
        Cmd::Copy { token, to, offset, token_offset, length, json, target } => {
            copy::copy(&target, token, to, offset, token_offset, length, json).await
        }
        Cmd::Snapshot { cmd, target } => copy::snapshot(&target, cmd).await,
        Cmd::Bench { cmd } => tandem_bench::run(cmd).await,
        // The suite is blocking code (threads, blocking clients): off the async workers.
        Cmd::Chaos { cmd } => tokio::task::spawn_blocking(move || tandem_chaos::cli::main(cmd)).await?,
    }
}
