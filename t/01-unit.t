#!/usr/bin/perl

# The pure-C unit tests (bucket math, key choice, header parsers) print
# TAP; this runs them under prove with the rest of the suite.

use strict;
use warnings;

use FindBin;

my $bin = $ENV{RATEPOOL_UNIT} || "$FindBin::Bin/../build/unit_tests";

unless (-x $bin) {
    print "1..0 # SKIP unit tests not built, run 'make unit'\n";
    exit 0;
}

exec $bin or die "cannot run $bin: $!";
