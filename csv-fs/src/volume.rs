//! The volume: its versioned header, its directories and the disk catalogue.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{now_ms, Error, Result};
use crate::fsutil::{atomic_write, check_name, fsync_dir, hex, is_full, random_bytes, read_optional, OfdLock};
use crate::image::{self, Format, Image, OpenMode};
use crate::lease::{FileLeaseStore, LeaseRecord, LeaseStore};

/// The on-disk layout version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "ferry-csv";
const HEADER: &str = "volume.json";
const DIRS: [&str; 3] = ["disks", "leases", "vms"];
/// Extensions a disk file may have, in lookup order.
const EXTENSIONS: [&str; 4] = ["raw", "vhd", "qcow2", "img"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHeader {
    pub magic: String,
    pub version: u32,
    pub id: String,
    pub created_unix_ms: u64,
}

/// The volume's record of a disk, `disks/NAME.json`, written by
/// [`Volume::create_disk`] before the image appears under its name. Its
/// format is the authority when the disk is opened: nothing the guest
/// writes into the image can change how the image is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub format: Format,
    pub virtual_size: u64,
    pub created_unix_ms: u64,
}

/// What `ferry disk info` shows.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    pub allocated_bytes: u64,
    pub lease: Option<LeaseRecord>,
}

/// What `ferry volume status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub path: PathBuf,
    pub id: String,
    pub version: u32,
    pub disks: usize,
    /// Disks with an owner whose lease has not expired.
    pub leased: usize,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Volume {
    root: PathBuf,
    header: VolumeHeader,
}

impl Volume {
    /// Makes `path` (created if missing) a new, empty volume. Two hosts
    /// racing to create the same volume: exactly one succeeds.
    pub fn create(path: &Path) -> Result<Volume> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let header_path = path.join(HEADER);
        if header_path.exists() {
            return Err(Error::VolumeExists { path: path.to_owned() });
        }
        for d in DIRS {
            let dir = path.join(d);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let header = VolumeHeader {
            magic: MAGIC.into(),
            version: FORMAT_VERSION,
            id: hex(&random_bytes::<16>()),
            created_unix_ms: now_ms(),
        };
        let bytes = serde_json::to_vec_pretty(&header).expect("the header serialises");
        // Publish with link(2), which unlike rename refuses to replace an
        // existing header.
        let tmp = path.join(format!(".{HEADER}.{}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()));
        let linked = written.and_then(|_| std::fs::hard_link(&tmp, &header_path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::VolumeExists { path: path.to_owned() })
            }
            Err(e) if is_full(&e) => return Err(Error::VolumeFull { path: header_path, what: "the volume header" }),
            Err(e) => return Err(Error::io(&header_path, e)),
        }
        fsync_dir(path)?;
        tracing::info!(path = %path.display(), id = header.id, "volume created");
        Ok(Volume { root: path.to_owned(), header })
    }

    /// Opens an existing volume, checking its header and layout.
    pub fn open(path: &Path) -> Result<Volume> {
        let header_path = path.join(HEADER);
        let bytes = read_optional(&header_path)?.ok_or_else(|| Error::NotAVolume { path: path.to_owned() })?;
        let corrupt = |reason: String| Error::CorruptVolume { path: header_path.clone(), reason };
        // Read the version first so that a future layout is named as such
        // even if the rest of its header changed shape.
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if value.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
            return Err(corrupt(format!("magic is not {MAGIC:?}")));
        }
        let found = value.get("version").and_then(|v| v.as_u64()).ok_or_else(|| corrupt("no version".into()))?;
        if found != FORMAT_VERSION as u64 {
            return Err(Error::UnsupportedVersion {
                path: header_path.clone(),
                found: found.min(u32::MAX as u64) as u32,
                supported: FORMAT_VERSION,
            });
        }
        let header: VolumeHeader = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        for d in DIRS {
            if !path.join(d).is_dir() {
                return Err(Error::CorruptVolume { path: path.to_owned(), reason: format!("{d}/ is missing") });
            }
        }
        Ok(Volume { root: path.to_owned(), header })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn header(&self) -> &VolumeHeader {
        &self.header
    }

    pub fn id(&self) -> &str {
        &self.header.id
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    pub fn leases_dir(&self) -> PathBuf {
        self.root.join("leases")
    }

    /// `vms/NAME/`, created if missing: a VM's files on the volume.
    pub fn vm_dir(&self, name: &str) -> Result<PathBuf> {
        check_name("VM", name)?;
        let dir = self.root.join("vms").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }

    /// The lease store on this volume, granting leases of `ttl`.
    pub fn lease_store(&self, ttl: Duration) -> FileLeaseStore {
        FileLeaseStore::new(&self.leases_dir(), ttl)
    }

    /// The image file of disk `name`.
    pub fn disk_path(&self, name: &str) -> Result<PathBuf> {
        check_name("disk", name)?;
        self.find_disk(name).ok_or_else(|| Error::NoSuchDisk { name: name.to_owned(), volume: self.root.clone() })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.disks_dir().join(format!("{name}.json"))
    }

    /// The record of disk `name`; `None` for a disk made before volumes
    /// kept records (its format then comes from its file's extension, see
    /// [`image::format_for_path`]).
    pub fn disk_record(&self, name: &str) -> Result<Option<DiskRecord>> {
        check_name("disk", name)?;
        let path = self.record_path(name);
        let Some(bytes) = read_optional(&path)? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::CorruptVolume { path, reason: format!("disk record: {e}") })
    }

    /// The format disk `name` is opened as: its record's, checked against
    /// its file's extension (or the extension's alone, for a disk without
    /// a record).
    pub fn disk_format(&self, name: &str) -> Result<Format> {
        let path = self.disk_path(name)?;
        let Some(record) = self.disk_record(name)? else { return image::format_for_path(&path) };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_owned();
        let matches = ext == record.format.extension() || (record.format == Format::Raw && ext == "img");
        if !matches {
            return Err(Error::FormatMismatch { path, recorded: record.format.name().into(), file: format!(".{ext}") });
        }
        Ok(record.format)
    }

    fn find_disk(&self, name: &str) -> Option<PathBuf> {
        EXTENSIONS.iter().map(|ext| self.disks_dir().join(format!("{name}.{ext}"))).find(|p| p.exists())
    }

    /// Creates disk `name` of `size` bytes. The image is built under a
    /// temporary name and renamed into place, so a crash never leaves a
    /// half-made disk under its real name.
    pub fn create_disk(&self, name: &str, format: Format, size: u64) -> Result<DiskInfo> {
        check_name("disk", name)?;
        let disks = self.disks_dir();
        // Serialises creators on all hosts, so two formats of one name
        // cannot both appear.
        let _lock = OfdLock::acquire(&disks.join(".catalog.lock"), true, Duration::from_secs(5))?;
        if let Some(path) = self.find_disk(name) {
            return Err(Error::DiskExists { name: name.to_owned(), path });
        }
        let path = disks.join(format!("{name}.{}", format.extension()));
        let tmp = disks.join(format!(".{name}.{}.creating", format.extension()));
        let _ = std::fs::remove_file(&tmp);
        if let Err(e) = Image::create(&tmp, format, size) {
            let _ = std::fs::remove_file(&tmp);
            return Err(match e {
                Error::Io { source, .. } if is_full(&source) => Error::VolumeFull { path, what: "the disk image" },
                Error::Io { source, .. } => Error::io(&path, source),
                e => e,
            });
        }
        // The record goes first: a disk never appears without one.
        let record = DiskRecord { format, virtual_size: size, created_unix_ms: now_ms() };
        let bytes = serde_json::to_vec_pretty(&record).expect("the record serialises");
        if let Err(e) = atomic_write(&self.record_path(name), &bytes, "the disk record") {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        fsync_dir(&disks)?;
        tracing::info!(disk = name, %format, size, "disk created");
        self.disk_info(name)
    }

    /// Opens disk `name` as the format its record names.
    pub fn open_disk(&self, name: &str, mode: OpenMode) -> Result<Image> {
        let format = self.disk_format(name)?;
        Image::open_as(&self.disk_path(name)?, format, mode)
    }

    pub fn disk_info(&self, name: &str) -> Result<DiskInfo> {
        let path = self.disk_path(name)?;
        let image = self.open_disk(name, OpenMode::ReadOnly)?;
        let lease = self.lease_store(crate::lease::DEFAULT_TTL).read(name)?;
        Ok(DiskInfo {
            name: name.to_owned(),
            format: image.format(),
            virtual_size: crate::image::BlockBackend::len(&image),
            allocated_bytes: image::allocated_bytes(&path)?,
            lease,
            path,
        })
    }

    /// Names of the disks on the volume, sorted.
    pub fn list_disks(&self) -> Result<Vec<String>> {
        let dir = self.disks_dir();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if file.starts_with('.') {
                continue;
            }
            if let Some((stem, ext)) = file.rsplit_once('.') {
                if EXTENSIONS.contains(&ext) && check_name("disk", stem).is_ok() {
                    names.push(stem.to_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub fn status(&self) -> Result<VolumeStatus> {
        let disks = self.list_disks()?;
        let store = self.lease_store(crate::lease::DEFAULT_TTL);
        let now = now_ms();
        let mut leased = 0;
        for d in &disks {
            // A corrupt record shows up in `disk info`; here it is not "leased".
            if let Ok(Some(r)) = store.read(d) {
                leased += usize::from(r.live_owner(now).is_some());
            }
        }
        let (free_bytes, total_bytes) = statvfs(&self.root)?;
        Ok(VolumeStatus {
            path: self.root.clone(),
            id: self.header.id.clone(),
            version: self.header.version,
            disks: disks.len(),
            leased,
            free_bytes,
            total_bytes,
        })
    }
}

fn statvfs(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::io(path, std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("csv-fs-vol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn create_open_and_catalogue() {
        let dir = scratch("cat");
        let v = Volume::create(&dir).unwrap();
        assert!(matches!(Volume::create(&dir), Err(Error::VolumeExists { .. })));
        let v2 = Volume::open(&dir).unwrap();
        assert_eq!(v.id(), v2.id());
        for (i, f) in Format::ALL.iter().enumerate() {
            let info = v.create_disk(&format!("d{i}"), *f, 4 << 20).unwrap();
            assert_eq!(info.format, *f);
            assert_eq!(info.virtual_size, 4 << 20);
            assert!(info.lease.is_none());
        }
        let e = v.create_disk("d0", Format::Qcow2, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::DiskExists { .. }), "{e}");
        assert_eq!(v.list_disks().unwrap(), ["d0", "d1", "d2", "d3"]);
        assert!(matches!(v.disk_info("nope"), Err(Error::NoSuchDisk { .. })));
        assert!(matches!(v.create_disk("../x", Format::Raw, 512), Err(Error::BadName { .. })));
        let st = v.status().unwrap();
        assert_eq!((st.disks, st.leased), (4, 0));
        assert!(v.vm_dir("vm0").unwrap().is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn header_problems_are_named() {
        let dir = scratch("hdr");
        assert!(matches!(Volume::open(&dir), Err(Error::NotAVolume { .. })));
        Volume::create(&dir).unwrap();
        let h = dir.join(HEADER);
        let text = std::fs::read_to_string(&h).unwrap();
        std::fs::write(&h, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
        let e = Volume::open(&dir).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { found: 7, supported: 1, .. }), "{e}");
        assert!(e.to_string().contains("version 7"), "{e}");
        std::fs::write(&h, &text[..text.len() / 2]).unwrap();
        assert!(matches!(Volume::open(&dir), Err(Error::CorruptVolume { .. })));
        std::fs::write(&h, text).unwrap();
        std::fs::remove_dir(dir.join("vms")).unwrap();
        assert!(matches!(Volume::open(&dir), Err(Error::CorruptVolume { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_record_names_the_format_not_the_content() {
        let dir = scratch("rec");
        let v = Volume::create(&dir).unwrap();
        for f in Format::ALL {
            let name = f.name();
            v.create_disk(name, f, 4 << 20).unwrap();
            let rec = v.disk_record(name).unwrap().unwrap();
            assert_eq!((rec.format, rec.virtual_size), (f, 4 << 20));
            assert_eq!(v.disk_format(name).unwrap(), f);
            assert_eq!(v.open_disk(name, OpenMode::ReadOnly).unwrap().format(), f);
        }
        assert_eq!(v.list_disks().unwrap().len(), 4, "records are not disks");

        // A raw disk whose guest wrote a qcow2 header and a VHD footer.
        let mut img = v.open_disk("raw", OpenMode::ReadWrite).unwrap();
        let mut q = vec![0u8; 512];
        let qpath = v.disk_path("qcow2").unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&qpath).unwrap(), &mut q, 0).unwrap();
        let mut foot = vec![0u8; 512];
        let fpath = v.disk_path("vhd-fixed").unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&fpath).unwrap(), &mut foot, 4 << 20).unwrap();
        use crate::image::BlockBackend;
        img.write_at(&q, 0).unwrap();
        img.write_at(&foot, (4 << 20) - 512).unwrap();
        img.flush().unwrap();
        drop(img);
        let img = v.open_disk("raw", OpenMode::ReadOnly).unwrap();
        assert_eq!(img.format(), Format::Raw);
        let mut back = vec![0u8; 512];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, q);
        img.read_at(&mut back, (4 << 20) - 512).unwrap();
        assert_eq!(back, foot);

        // A record that disagrees with the file is refused by name; a
        // disk without a record (an older volume) goes by its extension.
        let rec = DiskRecord { format: Format::Qcow2, virtual_size: 4 << 20, created_unix_ms: 0 };
        std::fs::write(v.record_path("raw"), serde_json::to_vec(&rec).unwrap()).unwrap();
        assert!(matches!(v.open_disk("raw", OpenMode::ReadOnly), Err(Error::FormatMismatch { .. })));
        std::fs::remove_file(v.record_path("raw")).unwrap();
        assert_eq!(v.open_disk("raw", OpenMode::ReadOnly).unwrap().format(), Format::Raw);
        std::fs::write(v.record_path("raw"), b"{").unwrap();
        assert!(matches!(v.open_disk("raw", OpenMode::ReadOnly), Err(Error::CorruptVolume { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
