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
    let ip_sets = match config.map(|c| config::load_file(c, &Overrides::default())) {
        Some(Ok(c)) => c.ip_sets,
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

fn explain(config: Option<&PathBuf>, request: &std::path::Path, host: &str) -> ExitCode {
    let cfg = match load(config, &Overrides::default()) {
        Ok(c) => c,
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
    // Route exactly as the proxy does.
    let cfg = std::sync::Arc::new(cfg);
    let metrics = match palisade::metrics::Metrics::new() {
        Ok(m) => std::sync::Arc::new(m),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let snapshot =
        palisade::snapshot::Snapshot::build(std::sync::Arc::clone(&cfg), Vec::new(), &[], &metrics);
    let Some(route) = snapshot
        .route_for(&host.to_ascii_lowercase(), &path)
        .map(|i| &cfg.routes[i])
    else {
        eprintln!("no route matches host {host:?} path {path:?}");
        return ExitCode::FAILURE;
    };
    println!(
        "route {:?} ({} rule set(s))",
        route.name,
        route.policy.rulesets.len()
    );
    let mut trace: Vec<String> = Vec::new();
    let outcome =
        palisade::rules::eval::evaluate(&route.policy.rulesets, &owned.input(), &mut trace);
    for l in &trace {
        println!("{l}");
    }
    println!("verdict: {:?}", outcome.verdict);
    println!("labels: {:?}", outcome.labels);
    if let Some(validation) = &route.policy.validation {
        explain_validation(route, validation, &owned, &metrics);
    }
    ExitCode::SUCCESS
}

/// Runs the route's request validation on an `explain` request and prints the outcome.
fn explain_validation(
    route: &config::Route,
    validation: &std::sync::Arc<palisade::schema::RouteValidation>,
    req: &palisade::rules::testing::OwnedRequest,
    metrics: &palisade::metrics::Metrics,
) {
    use palisade::pipeline::{Decision, Stage as _};
    let Some((head, body)) = req.head() else {
        println!("validate: the request is not valid HTTP (method or path)");
        return;
    };
    let stage = palisade::schema::ValidateStage::new(
        std::sync::Arc::clone(validation),
        &route.name,
        metrics.validation_failures.clone(),
    );
    let view = palisade::pipeline::RequestView {
        head: &head,
        client_ip: None,
        geo: Default::default(),
        body: (!body.is_empty()).then_some(body),
        body_complete: true,
    };
    match stage.evaluate(&view) {
        Decision::Block(b) => {
            let details = b
                .details
                .map(|d| serde_json::Value::Object(d.fields.clone()).to_string())
                .unwrap_or_default();
            println!("validate: {} {} {details}", b.status, b.reason);
        }
        Decision::Count(label) => println!("validate: counted {label}"),
        _ => println!("validate: pass"),
    }
}

fn load(config: Option<&PathBuf>, overrides: &Overrides) -> Result<Config, config::ConfigError> {
    match config {
        Some(path) => config::load_file(path, overrides),
        None => config::load_default(overrides),
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Geoip { command } => geoip(command),
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
        Command::Check { config } => match load(config.as_ref(), &Overrides::default()) {
            Ok(c) => {
                println!(
                    "{}: OK ({} listener(s), {} upstream(s), {} route(s))",
                    c.source,
                    c.listeners.len(),
                    c.upstreams.len(),
                    c.routes.len()
                );
                for r in &c.routes {
                    if let Some(v) = &r.policy.validation {
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
                eprintln!("{} error(s)", e.issues.len());
                ExitCode::FAILURE
            }
        },
        Command::Run {
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
            let config = match load(config.as_ref(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&config);
            tracing::info!(config = %config.source, "starting palisade");
            match palisade::server::run(config) {
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
