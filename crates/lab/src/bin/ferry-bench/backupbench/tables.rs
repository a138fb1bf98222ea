//! The backup bench's figures as Markdown tables.

use super::{Report, Sizes, GIB, MIB};

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

pub(super) fn print(r: &Report, sz: &Sizes) {
    let m = &r.mix;
    println!(
        "ferry backup benchmark, {} UTC ({}; {} cores; load before: {})",
        r.date, r.qemu, r.cpus, r.load_before
    );
    println!(
        "Disk: qcow2 of {:.1} GiB, the first {:.2} GiB in 4 MiB chunks: {} random, {} text, {} repeated (8 distinct), {} allocated zeros, {} half sparse text. \
         QEMU without a guest OS (vCPUs not started), writes through its block layer by HMP qemu-io; files on /var/tmp (ext4), the image in the page cache. MB = 10^6 bytes; \"data\" = the {:.2} GiB area read.",
        sz.disk as f64 / GIB as f64, sz.data as f64 / GIB as f64, m.random, m.text, m.repeated, m.zeros, m.half_sparse, sz.data as f64 / GIB as f64
    );
    println!();
    println!("## 1. Full backup (goal ≥ 500 MB/s of data per core, hashed + compressed)");
    println!();
    println!("| | wall | data MB/s | CPU s | data MB/s per core | output |");
    println!("|---|---|---|---|---|---|");
    let f = &r.full;
    println!(
        "| ferry full backup (bench process CPU; QEMU {:.1} s apart: {:.0} MB/s per core with it) | {:.1} s | {:.0} | {:.1} | {:.0} | {:.2} GB stored |",
        f.qemu_cpu_s, f.mbs_per_core_with_qemu, f.secs, f.mbs, f.cpu_s, f.mbs_per_core, gb(f.new_stored_bytes)
    );
    for p in &r.peers {
        println!(
            "| {} | {:.1} s | {:.0} | {:.1} | {:.0} | {:.2} GB |",
            p.what,
            p.secs,
            p.mbs,
            p.cpu_s,
            p.mbs_per_core,
            gb(p.out_bytes)
        );
    }
    let c = &r.components;
    println!();
    println!(
        "One core on the image's first {:.0} MiB of chunks: BLAKE3 {:.0} MB/s, zstd -1 encode {:.0} MB/s (to {:.0} %), decode + check {:.0} MB/s.",
        c.sample_bytes as f64 / MIB as f64, c.blake3_mbs, c.zstd_encode_mbs, c.encoded_ratio * 100.0, c.decode_check_mbs
    );
    println!();
    println!("## 2. Incremental backups, end to end (goal < 2 s after a 1 % change)");
    println!();
    println!("| guest changed | writes | 4 MiB chunks touched | read | end to end | ferry CPU |");
    println!("|---|---|---|---|---|---|");
    for i in &r.incrementals {
        println!(
            "| {} ({:.0} MiB) | {} | {} | {:.0} MiB | {:.2} s | {:.2} s |",
            i.change,
            i.changed_bytes as f64 / MIB as f64,
            i.writes,
            i.chunks_touched,
            i.backup.read_bytes as f64 / MIB as f64,
            i.backup.secs,
            i.backup.cpu_s
        );
    }
    println!("| reference: PBS, published | 628 MiB changed of 60 GiB | | | | 4 s |");
    println!();
    let w = &r.guest_writes;
    println!("## 3. Guest writes during a full backup (goal ≥ 80 %)");
    println!();
    println!("| sequential 1 MiB writes (HMP qemu-io) | MB/s | window | CPU s in the window: bench / QEMU |");
    println!("|---|---|---|---|");
    println!(
        "| alone | {:.0} | {:.1} s | {:.1} / {:.1} |",
        w.alone_mbs, w.alone_secs, w.alone_cpu.0, w.alone_cpu.1
    );
    println!(
        "| during a full backup (into an empty store; {:.1} s, {:.0} MB/s of data) | {:.0} ({:.0} %) | {:.1} s{} | {:.1} / {:.1} |",
        w.backup.secs, w.backup.mbs, w.during_mbs, w.ratio * 100.0, w.during_secs,
        if w.backup_outlasted_writes { "" } else { ", the backup ended first" },
        w.during_cpu.0, w.during_cpu.1
    );
    if let Some(d) = &r.dedup {
        println!();
        println!(
            "## 4. Dedup: {} clones of the base image, 8 × 4 MiB changed in each, one store",
            d.clones
        );
        println!();
        println!(
            "| | ferry store | peer: {} × qemu-img convert -c (zstd) | peer / ferry |",
            d.clones
        );
        println!("|---|---|---|---|");
        println!(
            "| bytes on disk | {:.2} GB | {:.2} GB | {:.1}× |",
            gb(d.usage.stored_bytes),
            gb(d.peer_bytes),
            d.peer_bytes as f64 / d.usage.stored_bytes as f64
        );
        println!(
            "| dedup factor (store's: disk sizes / stored) | {:.1} | — | — |",
            d.dedup_factor
        );
        println!(
            "| data read / unique plain / stored | {:.2} / {:.2} / {:.2} GB | — | — |",
            gb(d.read_bytes),
            gb(d.unique_plain_bytes),
            gb(d.usage.stored_bytes)
        );
        let secs: Vec<f64> = d.backups.iter().map(|b| b.secs).collect();
        println!(
            "| backup time: first clone, median of the others | {:.1} s, {:.1} s | — | — |",
            secs.first().copied().unwrap_or(f64::NAN),
            crate::median(secs.iter().skip(1).copied().collect())
        );
        if d.read_bytes > sz.data * d.clones as u64 {
            println!();
            println!(
                "Each clone's backup read {:.2} GB, its whole virtual disk: through the fleecing node (snapshot-access over copy-before-write) QEMU reports what the overlay leaves to its backing file as holes that are not zero, whatever the backing file holds there.",
                gb(d.read_bytes / d.clones as u64)
            );
        }
    }
    println!();
    println!("## 5. Restore to a raw file (data MB/s; both durable at the end)");
    println!();
    println!("| | wall | data MB/s | CPU s | speed vs qemu-img |");
    println!("|---|---|---|---|---|");
    let p = &r.restore_peer;
    for x in &r.restore {
        println!(
            "| ferry restore_raw, {} threads{} | {:.1} s | {:.0} | {:.1} | {:.2}× |",
            x.threads,
            if x.identical_to_qemu_img {
                " (byte-identical to qemu-img's)"
            } else {
                ""
            },
            x.secs,
            x.mbs,
            x.cpu_s,
            p.secs / x.secs
        );
    }
    println!(
        "| {} | {:.1} s | {:.0} | {:.1} | 1× |",
        p.what, p.secs, p.mbs, p.cpu_s
    );
    println!();
    if let Some(l) = &r.live_restore {
        println!("## 5b. Live-restore (QEMU on an empty volume backed by the backup over ferry's NBD server)");
        println!();
        println!("| | ferry | peer |");
        println!("|---|---|---|");
        println!(
            "| server up, QEMU started, first MiB read through the disk | {:.2} s | a plain restore first: {:.1} s |",
            l.first_read_secs,
            r.restore.first().map_or(0.0, |x| x.secs)
        );
        println!(
            "| random 4 KiB reads through the disk (HMP qemu-io), nothing filled yet | {:.2} ms | the original disk: {:.2} ms |",
            l.read_4k_ms, l.read_4k_ms_local
        );
        println!(
            "| fill with block-stream{} | {:.1} s, {:.0} data MB/s | restore to raw: {:.0} MB/s |",
            if l.identical_to_qemu_img {
                " (identical to qemu-img's copy)"
            } else {
                " (DIFFERS from qemu-img's copy)"
            },
            l.fill_secs,
            l.fill_mbs,
            r.restore.first().map_or(0.0, |x| x.mbs)
        );
        println!();
    }
    let v = &r.verify;
    println!("## 6. Verify and GC");
    println!();
    println!("| | result |");
    println!("|---|---|");
    println!(
        "| verify (the full backup's {} chunks, read + decompress + BLAKE3) | {:.1} s: {:.0} MB/s stored, {:.0} MB/s plain; {} bad |",
        v.chunks, v.secs, v.mbs_stored, v.mbs_plain, v.bad
    );
    let g = &r.gc;
    println!(
        "| {} distinct 4 KiB chunks written in one backup | {:.1} s ({:.0} chunks/s) |",
        g.chunks,
        g.write_secs,
        g.chunks as f64 / g.write_secs
    );
    println!("| that backup deleted | {:.2} s |", g.delete_secs);
    println!(
        "| GC afterwards (goal < 10 s) | {:.2} s, {} chunks removed |",
        g.gc_secs, g.removed_chunks
    );
}
