/** The program's version: major.minor.revision.build, as Veeam's tool prints it. */
export const VERSION = "0.1.0.0";
