//! The `palisade` command line: `run` the proxy, `check` a configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: the proxy path allocates many short-lived buffers and
/// glibc's malloc/free showed up as ~12% of CPU under load (perf, benches/load.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use palisade::config::{self, Config, LogFormat, Overrides};
use palisade::identity::geo::GeoDb;
use palisade::identity::geo_build::{self, GeoDbKind};

/// Palisade: an edge request-validation and WAF reverse proxy.
#[derive(Parser)]
#[command(name = "palisade", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config unless --config is given).
    Run {
        /// Take over the listening sockets of a running Palisade (graceful upgrade): start the
        /// new binary with --upgrade, then send SIGQUIT to the old process; it hands its
        /// sockets over and drains its connections.
        #[arg(long)]
        upgrade: bool,
        /// Unix socket used to hand listening sockets over during a graceful upgrade.
        #[arg(long, default_value = palisade::server::DEFAULT_UPGRADE_SOCK)]
        upgrade_sock: String,
        /// Configuration file (YAML). Without it, the embedded default is used: listen on
        /// 127.0.0.1:8080, admin on 127.0.0.1:9090, a built-in demo backend.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Client listener address; repeatable; replaces the config's listeners.
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Admin listener address.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Send every route to this upstream (`http://host:port`) instead of the config's.
        #[arg(long)]
        upstream: Option<String>,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Print a JSON Schema: of the configuration (default) or, with --ruleset, of rule-set files.
    Schema {
        /// The rule-set file format instead of the configuration.
        #[arg(long)]
        ruleset: bool,
    },
    /// Run the inline tests of rule-set files, offline; exit 1 on any failure.
    Test {
        /// Rule-set files or directories (default: rulesets/).
        paths: Vec<PathBuf>,
        /// A config whose ip sets the rules may reference.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show how one request is evaluated by a route's rule sets: every rule, the transformed
    /// values, and why each matched or not.
    Explain {
        /// Configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The request, as YAML (method, path, headers, body/json/form, client_ip, country).
        #[arg(long)]
        request: PathBuf,
        /// Host header used to pick the route (default: any).
        #[arg(long, default_value = "")]
        host: String,
    },
    /// Mint a signed test token (JWT) with a private key, or print the key's JWKS: the issuer
    /// of local trials (examples/fitness).
    Token {
        /// PEM private key (EC P-256 for ES256, Ed25519 for EdDSA, RSA for RS*/PS*).
        #[arg(long)]
        key: PathBuf,
        /// Signature algorithm.
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// `kid` header (and the JWKS key id).
        #[arg(long)]
        kid: Option<String>,
        /// Print the JWKS of the key instead of a token.
        #[arg(long)]
        jwks: bool,
        /// `iss`.
        #[arg(long, default_value = "")]
        iss: String,
        /// `sub`.
        #[arg(long, default_value = "")]
        sub: String,
        /// `aud` (repeatable).
        #[arg(long)]
        aud: Vec<String>,
        /// `scope`, space-separated.
        #[arg(long)]
        scope: Option<String>,
        /// Groups (repeatable), in the claim named by --groups-claim.
        #[arg(long)]
        group: Vec<String>,
        /// The claim holding the groups.
        #[arg(long, default_value = "cognito:groups")]
        groups_claim: String,
        /// More claims, NAME=VALUE (VALUE as JSON when it parses, else a string); repeatable.
        #[arg(long)]
        claim: Vec<String>,
        /// `token_use` (Cognito: access or id).
        #[arg(long)]
        token_use: Option<String>,
        /// Lifetime (`15m`, `1h`).
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// MaxMind database tooling.
    Geoip {
        #[command(subcommand)]
        command: GeoipCommand,
    },
    /// Validate a configuration without starting; lists every error, exits 1 if any.
    Check {
        /// Configuration file (YAML); without it the embedded default is checked.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum GeoipCommand {
    /// Build a `.mmdb` from CSV (`network,country_iso_code` or `network,asn,org`).
    Build {
        /// Database kind.
        #[arg(long, value_enum)]
        kind: GeoDbKind,
        /// Input CSV.
        #[arg(long)]
        csv: PathBuf,
        /// Output `.mmdb` file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Look an address up in MaxMind databases, as the proxy would.
    Lookup {
        /// Country (or City) database.
        #[arg(long)]
        country_db: Option<PathBuf>,
        /// ASN database.
        #[arg(long)]
        asn_db: Option<PathBuf>,
        /// The address.
        ip: std::net::IpAddr,
    },
}

fn geoip(command: GeoipCommand) -> ExitCode {
    match command {
        GeoipCommand::Build { kind, csv, out } => match geo_build::build(kind, &csv, &out) {
            Ok(n) => {
                println!("{}: {n} networks", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        GeoipCommand::Lookup {
            country_db,
            asn_db,
            ip,
        } => match GeoDb::open(country_db.as_deref(), asn_db.as_deref()) {
            Ok(db) => {
                let g = db.lookup(ip);
                println!(
                    "{}",
                    serde_json::json!({
                        "ip": ip.to_string(),
                        "country": g.country.map(|c| c.to_string()),
                        "asn": g.asn,
                    })
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_tests(paths: Vec<PathBuf>, config: Option<&PathBuf>) -> ExitCode {
    let ip_sets = match config.map(|c| compiled(Some(c))) {
        Some(Ok(s)) => s.ip_sets.clone(),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
        None => Default::default(),
    };
    let paths = if paths.is_empty() {
        vec![PathBuf::from("rulesets")]
    } else {
        paths
    };
    let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
    let reports = palisade::rules::testing::run_paths(&refs, &ip_sets);
    let (mut passed, mut failed, mut broken) = (0, 0, 0);
    for (file, r) in &reports {
        if let Some(e) = &r.load_error {
            broken += 1;
            println!("ERROR {file}\n{e}");
            continue;
        }
        passed += r.passed;
        failed += r.failures.len();
        let status = if r.failures.is_empty() {
            "ok  "
        } else {
            "FAIL"
        };
        println!(
            "{status} {file}: {} passed, {} failed",
            r.passed,
            r.failures.len()
        );
        for f in &r.failures {
            println!("  {f}");
        }
    }
    println!(
        "{} file(s): {passed} passed, {failed} failed, {broken} file(s) with errors",
        reports.len()
    );
    if failed == 0 && broken == 0 && !reports.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Loads, checks and compiles a configuration, as `palisade run` would.
fn compiled(config: Option<&PathBuf>) -> Result<palisade::snapshot::Snapshot, config::Problems> {
    let metrics = palisade::metrics::Metrics::new().map_err(|e| {
        config::Problems::from(config::Problem::file(&"<metrics>".into(), e.to_string()))
    })?;
    // A placeholder address for a demo upstream: nothing is started.
    let demo = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9)));
    palisade::compile::load_and_compile(
        config.map(PathBuf::as_path),
        &Overrides::default(),
        &palisade::compile::CompileContext::first(&std::sync::Arc::new(metrics), demo),
    )
}

fn explain(config: Option<&PathBuf>, request: &std::path::Path, host: &str) -> ExitCode {
    let snapshot = match compiled(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let req: palisade::rules::file::TestRequest = match std::fs::read_to_string(request)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_saphyr::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", request.display());
            return ExitCode::FAILURE;
        }
    };
    let owned = match palisade::rules::testing::OwnedRequest::from_test(&req) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{}: {e}", request.display());
            return ExitCode::FAILURE;
        }
    };
    let path = req
        .path
        .as_deref()
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_string();
    // Route exactly as the proxy does: on the normalized path.
    let path = match palisade::request::canon::normalize_path(
        &path,
        palisade::request::canon::EncodedSlash::Decode,
    ) {
        Ok(p) => p.decoded(),
        Err(r) => {
            eprintln!(
                "the proxy refuses this path with {} {}: {}",
                r.status, r.reason, r.detail
            );
            return ExitCode::FAILURE;
        }
    };
    let Some(route) = snapshot
        .route_for(&host.to_ascii_lowercase(), &path)
        .map(|i| &snapshot.routes[i])
    else {
        eprintln!("no route matches host {host:?} path {path:?}");
        return ExitCode::FAILURE;
    };
    println!(
        "route {:?} ({} rule set(s))",
        route.name,
        route.rulesets.len()
    );
    let mut trace: Vec<String> = Vec::new();
    let outcome = palisade::rules::eval::evaluate(&route.rulesets, &owned.input(), &mut trace);
    for l in &trace {
        println!("{l}");
    }
    println!("verdict: {:?}", outcome.verdict);
    println!("labels: {:?}", outcome.labels);
    // The whole pipeline, as the proxy runs it.
    let mut notes = palisade::pipeline::Notes::default();
    match route.pipeline.run_blocking(&owned.input(), &mut notes) {
        palisade::pipeline::Verdict::Block(stage, b) => {
            let details = b
                .details
                .map(|d| serde_json::Value::Object(d.fields.clone()).to_string())
                .unwrap_or_default();
            println!(
                "pipeline: blocked by {} ({} {}) {details}",
                stage.name(),
                b.status,
                b.reason
            );
        }
        v => println!("pipeline: {v:?}"),
    }
    if !notes.counted.is_empty() {
        println!("counted: {:?}", notes.counted);
    }
    ExitCode::SUCCESS
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Pingora builds each service's listeners inside a task it spawns, and a bind that fails
/// there (a port taken after `server::run` checked it) only panics that task: the process would
/// run on without the listener, its admin port answering as if all were well. A proxy missing a
/// configured listener must stop instead, with the reason.
fn exit_when_a_listener_cannot_be_built() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("Failed to build listeners") {
            eprintln!("palisade: cannot listen on a configured address ({message}); exiting");
            std::process::exit(1);
        }
    }));
}

fn main() -> ExitCode {
    exit_when_a_listener_cannot_be_built();
    let cli = Cli::parse();
    match cli.command {
        Command::Geoip { command } => geoip(command),
        Command::Token {
            key,
            alg,
            kid,
            jwks,
            iss,
            sub,
            aud,
            scope,
            group,
            groups_claim,
            claim,
            token_use,
            ttl,
        } => {
            let spec = palisade::auth::mint::MintSpec {
                issuer: iss,
                subject: sub,
                audiences: aud,
                scope,
                groups: group,
                groups_claim,
                claims: claim,
                ttl: ttl.into(),
                kid,
                token_use,
            };
            match mint_token(&key, &alg, jwks, &spec) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("palisade token: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Schema { ruleset } => {
            if ruleset {
                print!("{}", palisade::rules::ruleset_json_schema());
            } else {
                print!("{}", config::json_schema());
            }
            ExitCode::SUCCESS
        }
        Command::Test { paths, config } => run_tests(paths, config.as_ref()),
        Command::Explain {
            config,
            request,
            host,
        } => explain(config.as_ref(), &request, &host),
        Command::Check { config } => match compiled(config.as_ref()) {
            Ok(s) => {
                let c = &s.config;
                println!(
                    "{}: OK ({} listener(s), {} upstream(s), {} route(s))",
                    c.source,
                    c.listeners.len(),
                    c.upstreams.len(),
                    c.routes.len()
                );
                for r in s.routes.iter() {
                    if let Some(v) = &r.validation {
                        println!(
                            "  route {:?}: validates {} operation(s); schema files: {}",
                            r.name,
                            v.operations(),
                            v.files
                                .iter()
                                .map(|f| f.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} error(s)", e.len());
                ExitCode::FAILURE
            }
        },
        Command::Run {
            upgrade,
            upgrade_sock,
            config,
            listen,
            admin,
            upstream,
            threads,
        } => {
            let overrides = Overrides {
                listen,
                admin,
                upstream,
                threads,
            };
            let opts = palisade::server::RunOptions {
                config_path: config.clone(),
                overrides: overrides.clone(),
                upgrade,
                upgrade_sock,
            };
            let config = match config::load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config);
            tracing::info!(config = %config.source, "starting palisade");
            match palisade::server::run(config, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("palisade: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn mint_token(
    key: &std::path::Path,
    alg: &str,
    jwks: bool,
    spec: &palisade::auth::mint::MintSpec,
) -> Result<String, String> {
    use palisade::auth::mint;
    let alg = palisade::auth::parse_alg(alg).ok_or_else(|| format!("unknown algorithm {alg:?}"))?;
    let pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let key = mint::load_key(&pem, alg)?;
    if jwks {
        let set = mint::jwks(&key, alg, spec.kid.as_deref())?;
        return serde_json::to_string_pretty(&set).map_err(|e| e.to_string());
    }
    if spec.issuer.is_empty() || spec.subject.is_empty() {
        return Err("--iss and --sub are required to mint a token".into());
    }
    mint::mint(spec, &key, alg)
}
