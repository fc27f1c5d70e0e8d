#!/usr/bin/perl
# Gearman worker peer for the interop tests (Perl Gearman::Worker: plain GRAB_JOB).
# Usage: perl perl_worker.pl HOST PORT FUNC BEHAVIOR COUNT
#   BEHAVIOR: record (result "ok:<arg>") | fail (die -> WORK_FAIL)
# Prints {"event":"job",...} per job and {"event":"exit"} after COUNT jobs.
use strict;
use warnings;
use Gearman::Worker;
use JSON::PP;
use MIME::Base64;

my ($host, $port, $func, $behavior, $count) = @ARGV;
$| = 1;
my $worker = Gearman::Worker->new(job_servers => ["$host:$port"]);
my $done = 0;
$worker->register_function($func => sub {
    my $job = shift;
    my $arg = $job->arg;
    print encode_json({event => "job", handle => $job->handle, data_b64 => encode_base64($arg, "")}), "\n";
    $done++;
    die "asked to fail\n" if $behavior eq "fail";
    return "ok:" . $arg;
});
$worker->work(stop_if => sub { $done >= $count });
print encode_json({event => "exit"}), "\n";
