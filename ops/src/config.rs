//! The config file: TOML whose keys are the long flag names (`stats-port = 33333`,
//! `ports = ["6379:redis"]`, `daemonize = true`). A flag on the command line overrides the
//! same key in the file; `--config FILE` names the file.
//!
//! The file becomes command-line arguments placed before the real ones, so a setting means
//! exactly what its flag means, checked by the same parser, with the same error messages.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;

/// The config file named by `--config FILE` or `--config=FILE`, if any.
fn config_path(argv: &[OsString]) -> Result<Option<PathBuf>> {
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--config" {
            return match args.next() {
                Some(path) => Ok(Some(PathBuf::from(path))),
                None => bail!("--config needs a file"),
            };
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(path)));
        }
    }
    Ok(None)
}

fn scalar(key: &str, value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "'{key}' must be a string, number or boolean, not {}",
            other.type_str()
        ),
    })
}

/// `argv` with the settings of its config file (if it names one) inserted before the real
/// arguments, leaving out the settings the command line gives itself; `--config` is removed.
pub fn with_config_file(command: &clap::Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&argv)? else {
        return Ok(argv);
    };
    let argv: Vec<OsString> = {
        // Drop `--config FILE` / `--config=FILE` (before any `--`).
        let mut kept = Vec::with_capacity(argv.len());
        let mut args = argv.into_iter();
        let mut done = false;
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--") => {
                    done = true;
                    kept.push(arg);
                }
                Some("--config") if !done => {
                    args.next();
                }
                Some(a) if !done && a.starts_with("--config=") => {}
                _ => kept.push(arg),
            }
        }
        kept
    };
    let settings = load(&path)?;
    let given = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .ok();
    let on_command_line = |id: &str| {
        given.as_ref().is_some_and(|m| {
            m.try_contains_id(id).unwrap_or(false)
                && m.value_source(id) == Some(ValueSource::CommandLine)
        })
    };
    let mut options = Vec::new();
    let mut positional = Vec::new();
    for (key, value) in &settings {
        let name = key.replace('_', "-");
        let Some(arg) = command.get_arguments().find(|a| {
            a.get_long() == Some(name.as_str())
                || (a.is_positional() && a.get_id().as_str().replace('_', "-") == name)
        }) else {
            bail!(
                "{}: unknown setting '{key}' (settings are the long flag names of --help)",
                path.display()
            );
        };
        if on_command_line(arg.get_id().as_str()) {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| scalar(key, v))
                .collect::<Result<Vec<_>>>(),
            v => scalar(key, v).map(|s| vec![s]),
        }
        .with_context(|| format!("{}: bad setting", path.display()))?;
        if arg.is_positional() {
            positional.extend(values);
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        for value in values {
            match (takes_value, value.as_str()) {
                (true, _) => options.push(format!("--{name}={value}")),
                (false, "true") => options.push(format!("--{name}")),
                (false, "false") => {}
                (false, other) => bail!(
                    "{}: '{key}' is true or false, not '{other}'",
                    path.display()
                ),
            }
        }
    }
    let mut argv = argv.into_iter();
    let mut out: Vec<OsString> = argv.next().into_iter().collect();
    out.extend(options.into_iter().map(OsString::from));
    out.extend(argv);
    if !positional.is_empty() {
        if !out.iter().any(|a| a == "--") {
            out.push("--".into());
        }
        out.extend(positional.into_iter().map(OsString::from));
    }
    Ok(out)
}

fn load(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("{} is not valid TOML", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Args {
        #[arg(short = 'p', long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
        #[arg(short = 't', long)]
        threshold: Option<f64>,
        #[arg(long, default_value = "lo")]
        interface: String,
        #[arg(short = 'd', long)]
        daemonize: bool,
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    }

    fn parse(config: &str, args: &[&str]) -> Result<Args> {
        let dir = std::env::temp_dir().join(format!("tcpkit-ops-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(format!("{:x}.toml", config.len() * 31 + args.len()));
        std::fs::write(&file, config)?;
        let mut argv: Vec<OsString> = vec!["tool".into(), "--config".into(), file.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        let argv = with_config_file(&Args::command(), argv)?;
        std::fs::remove_file(&file).ok();
        Ok(Args::try_parse_from(argv)?)
    }

    #[test]
    fn the_file_gives_settings_and_flags_override_them() {
        let config = "ports = [6379, 6380]\nthreshold = 10\ninterface = \"eth0\"\ndaemonize = true\nfilter = \"not host 10.0.0.9\"\n";
        let a = parse(config, &[]).unwrap();
        assert_eq!(a.ports, vec![6379, 6380]);
        assert_eq!(a.threshold, Some(10.0));
        assert_eq!(a.interface, "eth0");
        assert!(a.daemonize);
        assert_eq!(a.filter.join(" "), "not host 10.0.0.9");
        let a = parse(
            config,
            &["-p", "11211", "--interface=lo", "-t", "2.5", "port", "1"],
        )
        .unwrap();
        assert_eq!(a.ports, vec![11211]);
        assert_eq!(a.interface, "lo");
        assert_eq!(a.threshold, Some(2.5));
        assert_eq!(a.filter.join(" "), "port 1");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let unknown = parse("port = 1\n", &[]).unwrap_err().to_string();
        assert!(unknown.contains("unknown setting 'port'"), "{unknown}");
        assert!(parse("ports = [1\n", &[])
            .unwrap_err()
            .to_string()
            .contains("not valid TOML"));
        assert!(parse("ports = \"x\"\n", &[]).is_err());
        assert!(parse("ports = [1]\ndaemonize = \"yes\"\n", &[]).is_err());
        assert!(parse("ports = [1]\n[section]\nx = 1\n", &[]).is_err());
        let argv = vec![
            OsString::from("tool"),
            "--config".into(),
            "/nonexistent.toml".into(),
        ];
        let missing = with_config_file(&Args::command(), argv)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cannot read the config file /nonexistent.toml"),
            "{missing}"
        );
    }
}
