#!/usr/bin/perl

# Runs each libFuzzer target (built by "make fuzz") for a few seconds:
# the usage scanner and the request body scanner, each checked to read
# the same however its input is split, and the header parsers.  RATEPOOL_FUZZ_SECONDS sets the time.

use strict;
use warnings;

use File::Temp qw(tempdir);
use FindBin;
use Test::More;

my $dir = $ENV{RATEPOOL_FUZZ_DIR} || "$FindBin::Bin/../build/fuzz";
my $seconds = $ENV{RATEPOOL_FUZZ_SECONDS} || 5;
my @targets = grep { -x "$dir/$_" }
              qw(fuzz_usage fuzz_parse fuzz_request fuzz_resp fuzz_eventstream);

plan skip_all => "fuzz targets not built, run 'make fuzz' (needs clang)"
    unless @targets;

for my $target (@targets) {
    my $work = tempdir(CLEANUP => 1);
    my $seeds = "$FindBin::Bin/fuzz/seeds/$target";
    my @corpus = ($work, -d $seeds ? $seeds : ());

    my $out = `cd $work && "$dir/$target" -max_total_time=$seconds \\
               -max_len=4096 -print_final_stats=1 @corpus 2>&1`;
    my ($runs) = $out =~ /stat::number_of_executed_units:\s*(\d+)/;

    is($?, 0, "$target runs $seconds s without a crash or a mismatch")
        or diag join "\n", (split /\n/, $out)[-30 .. -1];
    cmp_ok($runs // 0, '>', 1000, "$target executed many inputs");
}

done_testing;
